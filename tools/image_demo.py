# Copyright (c) boat-mm contributors. All rights reserved.
"""Draw a model's prediction on one image and print it in short.

The ``demo/image_demo.py`` of mmpretrain, mmsegmentation and mmdetection
for any of their configs, chosen by the config's ``default_scope`` (as
``tools/train.py`` and ``tools/test.py`` dispatch), run by the upstream
inferencers:

* mmpretrain (classification): ``ImageClassificationInferencer``; the
  drawing and the text list the ``--topk`` classes with their scores (an
  image under 224 px is drawn enlarged to 224, for the text to fit);
* mmseg (segmentation): ``MMSegInferencer``; the class colours are blended
  over the image (``--opacity``, ``--with-labels``) and the text lists the
  ``--topk`` classes covering most pixels, with their share;
* mmdet (detection): ``DetInferencer``; boxes (and masks) scoring above
  ``--pred-score-thr`` are drawn and counted per class.

The class names (and the palette) are the checkpoint's ``dataset_meta``,
which ``tools/train.py`` saves (the generated datasets' classes for a run
on them). A checkpoint without it (a converted published file, a bare
``state_dict``), or no checkpoint, takes those of the config's test
dataset (its ``metainfo``, else its dataset class's, else the folders of
an mmpretrain ``CustomDataset``), where the upstream inferencers would fall
back to Cityscapes' (mmseg) or COCO's (mmdet). A checkpoint that leaves
any of the model's weights at their initial values (one of another
config) is refused, as ``tools/test.py`` refuses it.

The arguments are those of the upstream demos: the image first, then the
config; the checkpoint is ``--checkpoint`` (mmpretrain's, and our tools'),
``--weights`` (mmdet's) or the third positional argument (mmseg's); the
drawing goes to ``--out-file`` (mmseg's) or into ``--out-dir``/vis/
(mmdet's).

Examples::

    python tools/image_demo.py demo.jpg \\
        configs/demo/boat-cswin-tiny_upernet_demo.py \\
        --checkpoint work_dirs/demo/iter_2000.pth --out-file pred.png
    python tools/image_demo.py demo.jpg CONFIG CKPT --topk 3
    python tools/image_demo.py demo.jpg \\
        configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py \\
        --checkpoint CKPT --pred-score-thr 0.5 --device cuda:0
"""
import argparse
import copy
import logging
import os.path as osp
import re
import sys
import warnings
from datetime import datetime
from typing import Any, List, Optional, Sequence, Tuple

import cv2
import mmcv
import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger, print_log

import boat_mm  # noqa: F401  (registers the BOAT models)

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from boat_tools.cli import (ArgumentParser, UsageError, check_checkpoint,
                            check_device, check_image, check_output_file,
                            load_config, no_test_set, tool_main)
from boat_tools.config import add_cfg_options_arg, checkpoint_fit_error
from boat_tools.inference import config_scope

TOOL = 'image_demo'
# Short edge (px) below which a classification is drawn enlarged to it.
CLS_MIN_SIZE = 224


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(
        description='Draw the prediction of a classifier, segmentor or '
        'detector on one image')
    parser.add_argument('img', help='image file')
    parser.add_argument(
        'config', help='mmpretrain, mmseg or mmdet config file')
    parser.add_argument(
        'ckpt',
        nargs='?',
        metavar='checkpoint',
        help='checkpoint file (.pth), as in mmseg\'s demo; or --checkpoint')
    parser.add_argument(
        '--checkpoint',
        '--weights',
        dest='checkpoint',
        help='checkpoint file (.pth); --weights as in mmdet\'s demo')
    parser.add_argument(
        '--out-file',
        help='the drawn prediction (default result.png; PNG keeps the '
        'class colours exact, JPEG does not)')
    parser.add_argument(
        '--out-dir',
        help="as in mmdet's demo: the drawing goes to OUT_DIR/vis/, named "
        'as the image (instead of --out-file)')
    parser.add_argument(
        '--device', default='cpu', help='e.g. cpu, cuda:0 (default cpu)')
    parser.add_argument(
        '--topk',
        type=int,
        default=5,
        help='classes listed: the best scores (classification) or the '
        'largest pixel shares (segmentation); default 5')
    parser.add_argument(
        '--opacity',
        type=float,
        default=0.5,
        help='segmentation: weight of the class colours over the image, in '
        '(0, 1] (default 0.5)')
    parser.add_argument(
        '--with-labels',
        action='store_true',
        help='segmentation: write the class names on the drawing')
    parser.add_argument(
        '--pred-score-thr',
        type=float,
        default=0.3,
        help='detection: draw and count the detections scoring above it '
        '(default 0.3)')
    add_cfg_options_arg(parser)
    args = parser.parse_args(argv)
    if args.ckpt is not None and args.checkpoint is not None \
            and args.ckpt != args.checkpoint:
        parser.error(f'two checkpoints given ({args.ckpt} and --checkpoint '
                     f'{args.checkpoint}); give one')
    args.checkpoint = args.checkpoint or args.ckpt
    if args.out_dir is not None and args.out_file is not None:
        parser.error('--out-file and --out-dir both given; give one')
    if args.out_dir is not None:
        args.out_file = osp.join(args.out_dir, 'vis', osp.basename(args.img))
    args.out_file = args.out_file or 'result.png'
    if args.img.endswith('.py'):
        parser.error(f'the image {args.img!r} is a Python file: the order '
                     f'is IMG CONFIG [CHECKPOINT], as in the upstream '
                     f'demo/image_demo.py')
    if args.topk < 1:
        parser.error(f'--topk must be >= 1, got {args.topk}')
    if not 0 < args.opacity <= 1:
        parser.error(f'--opacity must be in (0, 1], got {args.opacity}')
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Check the image, the output file, the device and the checkpoint;
    each mistake is a one-line error with its fix.

    Args:
        args (argparse.Namespace): The parsed command line.
    """
    check_image(args.img)
    check_output_file(args.out_file, '--out-file', 'pred.png')
    if not cv2.haveImageWriter(args.out_file):
        raise UsageError(f'--out-file {args.out_file!r}: no image format '
                         f'for that name; end it with .png or .jpg')
    check_device(args.device)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)


def read_checkpoint(checkpoint: Optional[str]) -> Optional[dict]:
    """The checkpoint file, loaded once for its weights and class names.

    Args:
        checkpoint (str, optional): The checkpoint file or URL.

    Returns:
        dict | None: The loaded checkpoint; None without one.
    """
    if checkpoint is None:
        return None
    from mmengine.runner import CheckpointLoader
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    return ckpt if isinstance(ckpt, dict) else {}


def checkpoint_dataset_meta(ckpt: Optional[dict]) -> Optional[dict]:
    """The ``meta['dataset_meta']`` that training saved in a checkpoint.

    Args:
        ckpt (dict, optional): The loaded checkpoint.

    Returns:
        dict | None: The classes (and palette), or None if it has none.
    """
    return ((ckpt or {}).get('meta') or {}).get('dataset_meta') or None


def check_fits(model: torch.nn.Module, ckpt: Optional[dict],
               args: argparse.Namespace) -> None:
    """Refuse a checkpoint that leaves any of the model's weights at their
    initial values (the upstream inferencers load non-strictly), as
    tools/test.py does.

    Args:
        model (torch.nn.Module): The inferencer's model, loaded.
        ckpt (dict, optional): The loaded checkpoint.
        args (argparse.Namespace): The parsed command line.
    """
    if ckpt is None:
        return
    error = checkpoint_fit_error(model, ckpt, '--checkpoint', args.checkpoint)
    if error:
        raise UsageError(error)


def config_dataset_meta(cfg: Config) -> dict:
    """The metainfo of the config's test dataset: its ``metainfo`` merged
    into that of its dataset class, as the dataset computes it (mmseg picks
    the palette of a subset of its classes), without reading any data but
    the folder names of an mmpretrain ``CustomDataset`` without classes,
    which are its classes.

    Args:
        cfg (Config): The config, its scope set as default.

    Returns:
        dict: With ``classes`` and, where the dataset has one, ``palette``.
    """
    from mmengine.registry import DATASETS
    dataset = copy.deepcopy(cfg.test_dataloader.dataset)
    while isinstance(dataset.get('dataset'), dict):  # dataset wrappers
        dataset = dataset['dataset']
    dataset['lazy_init'] = True
    built = DATASETS.build(dataset)
    metainfo = dict(built.metainfo)
    unfound = ''
    if 'classes' not in metainfo:
        try:
            built.full_init()
            metainfo = dict(built.metainfo)
        except (OSError, AssertionError, RuntimeError) as error:
            unfound = f' and could not find them in its data ({error})'
    if 'classes' not in metainfo:
        raise UsageError(
            f'the config\'s test dataset ({dataset["type"]}) names no '
            f'classes{unfound}, and the checkpoint has none: set '
            "test_dataloader.dataset.metainfo=dict(classes=('a', 'b', ...)) "
            'in the config, or pass a checkpoint tools/train.py saved (it '
            'holds the class names)')
    print_log(
        f'Class names of the config\'s test dataset ({dataset["type"]}, '
        f'{len(metainfo["classes"])} classes): no checkpoint, or none '
        f'with meta.dataset_meta.',
        logger='current')
    return metainfo


# What the upstream inferencers warn when a checkpoint has no class names:
# their fallback, which config_dataset_meta replaces.
_FALLBACK_WARNINGS = (r'dataset_meta or class names are not saved',
                      r'weights is None, use \w+ classes by default')
# What MMEngine logs for every mmseg and mmdet inferencer: neither package
# has a "function" registry, so the collate function is MMEngine's
# pseudo_collate, which is what those inferencers use.
_SCOPE_LOG = (r'^Failed to search registry with scope "\w+" in the '
              r'"function" registry tree')


def _build(inferencer: type, meta: Optional[dict], cfg: Config,
           **kwargs: Any) -> Any:
    """Build an upstream inferencer; without the checkpoint's class
    names, without its warning about the fallback replaced here; without
    MMEngine's message on the missing "function" registry."""
    cfg = copy.deepcopy(cfg)
    if 'visualizer' in cfg:
        # main writes the drawing: no storage backend (the configs' local
        # one, without a save_dir, is dropped with a warning).
        cfg.visualizer.vis_backends = None
    logger = MMLogger.get_current_instance()

    def keep(record: logging.LogRecord) -> bool:
        return re.search(_SCOPE_LOG, record.getMessage()) is None

    logger.addFilter(keep)
    try:
        with warnings.catch_warnings():
            if meta is None:
                for message in _FALLBACK_WARNINGS:
                    warnings.filterwarnings('ignore', message=message)
            return inferencer(cfg, **kwargs)
    finally:
        logger.removeFilter(keep)


def _class_name(classes: Optional[Sequence[str]], label: int) -> str:
    """The name of a label; the label itself where ``classes`` has none
    for it (None, or fewer names than the model has outputs)."""
    if classes is not None and label < len(classes):
        return classes[label]
    return str(label)


def _unique_name(prefix: str) -> str:
    """A visualizer name no other instance has (MMEngine keeps one
    instance per name)."""
    return f'{prefix}-{datetime.now().timestamp()}'


def classify(cfg: Config, args: argparse.Namespace,
             ckpt: Optional[dict]) -> Tuple[np.ndarray, dict, List[str]]:
    """Classify the image with mmpretrain's inferencer.

    Args:
        cfg (Config): An mmpretrain config.
        args (argparse.Namespace): The parsed command line.
        ckpt (dict, optional): The loaded checkpoint.

    Returns:
        tuple: The drawing (RGB), the result (``labels``, ``scores``,
        ``classes`` of the top k) and the lines to print.
    """
    import mmpretrain.utils.progress
    from mmpretrain.apis import ImageClassificationInferencer
    from mmpretrain.visualization import UniversalVisualizer

    # One image: no progress bar.
    mmpretrain.utils.progress.disable_progress_bar = True
    inferencer = ImageClassificationInferencer(
        cfg, pretrained=args.checkpoint or False, device=args.device)
    check_fits(inferencer.model, ckpt, args)
    if checkpoint_dataset_meta(ckpt) is None:
        inferencer.classes = config_dataset_meta(cfg).get('classes')
    sample = inferencer(args.img, return_datasamples=True)[0]
    scores = sample.pred_score.float().cpu()
    k = min(args.topk, scores.numel())
    top = scores.topk(k)
    classes = inferencer.classes
    names = [_class_name(classes, i) for i in top.indices.tolist()]
    # mmpretrain's drawing lists the sample's pred_label: the top k here.
    drawn_sample = sample.clone().set_pred_label(top.indices)
    image = mmcv.imread(args.img, channel_order='rgb')
    visualizer = UniversalVisualizer(name=_unique_name('image_demo'))
    drawing = visualizer.visualize_cls(
        image,
        drawn_sample,
        classes=classes,
        draw_gt=False,
        # The text is sized to the image: small ones are drawn larger.
        resize=CLS_MIN_SIZE if min(image.shape[:2]) < CLS_MIN_SIZE else None)
    lines = [f'{args.img}: top {k} of {scores.numel()} classes']
    lines += [
        f'  {score:.3f}  {name} ({label})' for score, name, label in zip(
            top.values.tolist(), names, top.indices.tolist())
    ]
    result = dict(
        labels=top.indices.tolist(), scores=top.values.tolist(), classes=names)
    return drawing, result, lines


def segment(cfg: Config, args: argparse.Namespace,
            ckpt: Optional[dict]) -> Tuple[np.ndarray, dict, List[str]]:
    """Segment the image with mmseg's inferencer.

    Args:
        cfg (Config): An mmseg config.
        args (argparse.Namespace): The parsed command line.
        ckpt (dict, optional): The loaded checkpoint.

    Returns:
        tuple: The drawing (RGB), the result (``mask``, the ``(H, W)``
        label map, and ``shares``, ``[(label, class, share)]`` of the
        classes present, largest first) and the lines to print.
    """
    from mmseg.apis import MMSegInferencer
    meta = checkpoint_dataset_meta(ckpt)
    inferencer = _build(
        MMSegInferencer,
        meta,
        cfg,
        weights=args.checkpoint,
        device=args.device)
    check_fits(inferencer.model, ckpt, args)
    inferencer.show_progress = False
    classes = inferencer.model.dataset_meta['classes']
    if meta is None:
        config_meta = config_dataset_meta(cfg)
        classes = config_meta['classes']
        inferencer.model.dataset_meta = dict(
            classes=classes, palette=config_meta['palette'])
    out = inferencer(
        args.img,
        return_vis=True,
        opacity=args.opacity,
        with_labels=args.with_labels)
    mask = np.asarray(out['predictions'])
    counts = np.bincount(mask.ravel())
    present = sorted(np.flatnonzero(counts), key=lambda i: -counts[i])
    shares = [(int(i), _class_name(classes, i), counts[i] / mask.size)
              for i in present]
    h, w = mask.shape
    lines = [
        f'{args.img}: {h}x{w} pixels, {len(shares)} classes; the '
        f'{min(args.topk, len(shares))} largest shares:'
    ]
    lines += [
        f'  {100 * share:5.1f} %  {name} ({label})'
        for label, name, share in shares[:args.topk]
    ]
    return out['visualization'], dict(mask=mask, shares=shares), lines


def detect(cfg: Config, args: argparse.Namespace,
           ckpt: Optional[dict]) -> Tuple[np.ndarray, dict, List[str]]:
    """Detect objects in the image with mmdet's inferencer.

    Args:
        cfg (Config): An mmdet config.
        args (argparse.Namespace): The parsed command line.
        ckpt (dict, optional): The loaded checkpoint.

    Returns:
        tuple: The drawing (RGB), the result (``instances``, all the
        predicted ones, ``kept``, the indices of those scoring above
        ``--pred-score-thr``, ``counts``, ``{class: number}`` of those) and
        the lines to print.
    """
    from mmdet.apis import DetInferencer
    meta = checkpoint_dataset_meta(ckpt)
    inferencer = _build(
        DetInferencer,
        meta,
        cfg,
        weights=args.checkpoint,
        device=args.device,
        show_progress=False)
    check_fits(inferencer.model, ckpt, args)
    if meta is None:
        config_meta = config_dataset_meta(cfg)
        dataset_meta = dict(inferencer.model.dataset_meta)
        dataset_meta['classes'] = config_meta['classes']
        inferencer.model.dataset_meta = dataset_meta
        inferencer.visualizer.dataset_meta = dataset_meta
    out = inferencer(
        args.img,
        return_vis=True,
        return_datasamples=True,
        no_save_vis=True,
        pred_score_thr=args.pred_score_thr)
    instances = out['predictions'][0].pred_instances.cpu()
    # mmdet's visualizer draws the scores strictly above the threshold.
    kept = torch.nonzero(instances.scores > args.pred_score_thr)[:, 0]
    classes = inferencer.model.dataset_meta['classes']
    counts = {}
    for label in instances.labels[kept].tolist():
        name = _class_name(classes, label)
        counts[name] = counts.get(name, 0) + 1
    per_class = ', '.join(
        f'{name} {n}'
        for name, n in sorted(counts.items(), key=lambda item: -item[1]))
    lines = [
        f'{args.img}: {len(kept)} detections score above '
        f'{args.pred_score_thr} (of {len(instances)})' +
        (f': {per_class}' if per_class else '')
    ]
    result = dict(instances=instances, kept=kept.tolist(), counts=counts)
    return out['visualization'][0], result, lines


TASKS = {'mmpretrain': classify, 'mmseg': segment, 'mmdet': detect}


@tool_main
def main(argv: Optional[List[str]] = None) -> dict:
    """Run the tool; returns ``task`` (the config's scope), ``drawing``
    (RGB, as written), ``out_file``, ``lines`` (as printed) and the task's
    result (see :func:`classify`, :func:`segment`, :func:`detect`)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    scope = config_scope(cfg, TOOL)
    if cfg.get('test_dataloader') is None:
        raise no_test_set(
            cfg, 'no test_dataloader',
            'image_demo.py takes the test pipeline and '
            'class names from')
    check_inputs(args)
    if args.checkpoint is None:
        print_log(
            'No checkpoint: the prediction is that of randomly initialised '
            'weights.',
            logger='current')
    ckpt = read_checkpoint(args.checkpoint)
    from mmengine.registry import init_default_scope
    init_default_scope(scope)
    drawing, result, lines = TASKS[scope](cfg, args, ckpt)
    mmcv.imwrite(drawing[..., ::-1], args.out_file)
    lines.append(f'Saved {args.out_file} ({drawing.shape[1]}x'
                 f'{drawing.shape[0]} px).')
    print('\n'.join(lines))
    return dict(
        result,
        task=scope,
        drawing=drawing,
        out_file=args.out_file,
        lines=lines)


if __name__ == '__main__':
    main()
