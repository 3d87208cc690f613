# Copyright (c) boat-mm contributors. All rights reserved.
"""Test (and evaluate) a checkpoint of an mmseg, mmpretrain or mmdet config.

Works like the ``tools/test.py`` of mmsegmentation, mmpretrain and
mmdetection, for any of their configs (chosen by the config's
``default_scope``):

* ``--tta``: test-time augmentation with the config's ``tta_model`` and
  ``tta_pipeline`` (mmseg: multi-scale + flip from the ADE20K base;
  mmpretrain: flip averaging when the config has none, scoring the
  averaged weights of a config with an EMA hook; mmdet: flip with
  box merging by NMS when the config has none, box detectors only, as
  mmdet's ``DetTTAModel`` does not merge masks);
* ``--show`` / ``--show-dir DIR``: draw predictions (next to the ground
  truth for segmentation and detection) into windows or image files; a
  relative ``DIR`` is inside the run's log folder, ``WORK_DIR/TIMESTAMP/
  DIR``, for every scope (what mmdet's and mmseg's tools document; mmseg
  through :mod:`boat_tools.seg_visualization`); ``--interval N`` draws
  samples ``0, N, 2N, ...`` for every scope (mmpretrain's count; mmseg's
  hook counts batches and mmdet's draws every test image, hence
  :mod:`boat_tools.seg_visualization` and
  :mod:`boat_tools.det_visualization`); mmpretrain: in RGB (mmpretrain's
  hook swaps red and blue), with ``--tta`` the merged prediction on the
  unflipped view (:mod:`boat_tools.visualization`);
* ``--out``: mmseg: a folder for the predicted label maps; mmpretrain: a
  pickle file of the predictions (``--out-item pred``) or metrics; mmdet:
  a pickle file of the predictions.

Examples::

    python tools/test.py configs/boat_upernet_ade20k.py CKPT --tta
    python tools/test.py CONFIG CKPT --out preds.pkl  # mmdet config
    python tools/test.py CONFIG CKPT --show-dir vis --work-dir work_dirs/x
    bash tools/dist_test.sh CONFIG CKPT 8
    GPUS=8 bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CKPT
"""
import argparse
import os.path as osp
import sys
from copy import deepcopy
from typing import List, Optional

# The tools' shared code (tools/boat_tools); imported before mmengine, as it
# silences mmengine's warnings that are not the user's concern.
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import mmengine
from boat_tools.cli import (ArgumentParser, UsageError, check_checkpoint,
                            load_config, no_test_set, tool_main)
from boat_tools.config import (adapt_cfg_to_device, add_launcher_args,
                               build_runner, check_checkpoint_fits,
                               check_data_roots, check_num_classes, close_dist,
                               init_cpu_dist, merge_common_args,
                               parse_launcher_args)
from mmengine.config import Config, ConfigDict

import boat_mm  # noqa: F401,E402  (registers models, checkpoint allow-list)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(description='Test (and evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        help='mmseg: directory to save the predicted label maps; '
        'mmpretrain: file to dump the predictions (or metrics) to; mmdet: '
        '.pkl file to dump the predictions to')
    parser.add_argument(
        '--out-item',
        choices=['metrics', 'pred'],
        help='mmpretrain: what --out holds (default: predictions)')
    parser.add_argument(
        '--show', action='store_true', help='show the results in a window')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images are saved; a relative one '
        'is inside the run\'s log folder, WORK_DIR/TIMESTAMP/SHOW_DIR')
    parser.add_argument(
        '--interval',
        type=int,
        default=1,
        help='visualise every n-th sample (with --show / --show-dir)')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='display time (s)')
    parser.add_argument(
        '--tta',
        action='store_true',
        help='test-time augmentation with the config\'s `tta_model` and '
        '`tta_pipeline`')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='run the test loop under autocast (fp16 on GPU; bf16 on CPU, '
        'mmseg and mmpretrain configs only)')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='disable pin_memory in the dataloader')
    add_launcher_args(parser)
    args = parse_launcher_args(parser, argv)
    if args.out is None and args.out_item is not None:
        parser.error('--out-item needs --out')
    if args.interval < 1:
        parser.error(f'--interval must be >= 1 (1 draws every sample), got '
                     f'{args.interval}')
    return args


def _scope(cfg: Config) -> str:
    return cfg.get('default_scope', 'mmengine')


def _is_hook(hook: dict, scope: str, name: str) -> bool:
    """Whether the hook config is ``scope``'s own ``name`` (its type with
    or without the scope's prefix)."""
    return hook.get('type') in (name, f'{scope}.{name}')


def _visualization(cfg: Config, args: argparse.Namespace) -> None:
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise UsageError(
            '--show/--show-dir need a visualization hook in default_hooks, '
            'e.g. default_hooks = dict(visualization=dict('
            'type=\'SegVisualizationHook\')) (mmseg), '
            'dict(type=\'VisualizationHook\') (mmpretrain) or '
            'dict(type=\'DetVisualizationHook\') (mmdet).')
    hook['interval'] = args.interval
    hook['show'] = args.show
    hook['wait_time'] = args.wait_time
    scope = _scope(cfg)
    if scope == 'mmpretrain':
        hook['enable'] = True
        hook['out_dir'] = args.show_dir
        if _is_hook(hook, 'mmpretrain', 'VisualizationHook'):
            # mmpretrain's hook draws the BGR images as RGB ones and takes
            # the views of a TTA batch for images (boat_tools/visualization).
            import boat_tools.visualization  # noqa: F401 (registers it)
            hook['type'] = 'ClsTestVisualizationHook'
    elif scope == 'mmdet':
        hook['draw'] = True
        if args.show_dir:
            hook['test_out_dir'] = args.show_dir
        if _is_hook(hook, 'mmdet', 'DetVisualizationHook'):
            # mmdet's hook draws every test image whatever its interval.
            import boat_tools.det_visualization  # noqa: F401 (registers)
            hook['type'] = 'DetIntervalVisualizationHook'
    else:
        hook['draw'] = True
        seg_hook = _is_hook(hook, 'mmseg', 'SegVisualizationHook')
        if args.show_dir and not seg_hook:
            raise UsageError(
                f'--show-dir of an mmseg config needs mmseg\'s '
                f'SegVisualizationHook in default_hooks.visualization, '
                f'got {hook.get("type")!r}.')
        if seg_hook:
            # mmseg's hook has no test_out_dir and counts its interval in
            # batches (boat_tools/seg_visualization.py).
            import boat_tools.seg_visualization  # noqa: F401 (registers)
            hook['type'] = 'SegShowDirVisualizationHook'
            if args.show_dir:
                hook['test_out_dir'] = args.show_dir


def _pretrain_show_dir(runner, show_dir: str) -> None:
    """Put a relative ``--show-dir`` of an mmpretrain config inside the
    run's log folder, as mmdet's hook does (mmpretrain's hook writes to
    its ``out_dir`` as given; the folder is known once the runner is)."""
    from mmpretrain.engine.hooks import VisualizationHook
    for hook in runner.hooks:
        if isinstance(hook, VisualizationHook):
            hook.out_dir = osp.join(runner.work_dir, runner.timestamp,
                                    show_dir)


def _test_dataset(cfg: Config) -> ConfigDict:
    """The test dataset config inside its dataset wrappers, if any."""
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    return dataset


def _det_tta_defaults(cfg: Config) -> None:
    """mmdet's defaults (those of its test tool): horizontal flip, boxes
    of both views merged by NMS."""
    roi_head = cfg.model.get('roi_head') or {}
    if 'tta_model' not in cfg and (roi_head.get('mask_head')
                                   or cfg.model.get('mask_head')):
        raise UsageError(
            '--tta with an instance segmentation model: mmdet\'s '
            'DetTTAModel merges boxes only, not masks. Test without --tta, '
            'or use a box detector (e.g. a retinanet_* config).')
    cfg.setdefault(
        'tta_model',
        dict(
            type='DetTTAModel',
            tta_cfg=dict(
                nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)))
    if 'tta_pipeline' not in cfg:
        pipeline = deepcopy(_test_dataset(cfg).pipeline)
        pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[[
                dict(type='RandomFlip', prob=1.),
                dict(type='RandomFlip', prob=0.)
            ],
                        [
                            dict(
                                type='PackDetInputs',
                                meta_keys=('img_id', 'img_path', 'ori_shape',
                                           'img_shape', 'scale_factor', 'flip',
                                           'flip_direction'))
                        ]])
        cfg.tta_pipeline = pipeline


def _tta(cfg: Config) -> None:
    if _scope(cfg) == 'mmdet':
        _det_tta_defaults(cfg)
    if _scope(cfg) == 'mmpretrain':
        # As mmpretrain's tool: flip averaging unless the config says more.
        cfg.setdefault('tta_model', dict(type='mmpretrain.AverageClsScoreTTA'))
        # mmpretrain's EMAHook would load no averaged weights into a TTA
        # wrapper (boat_tools/ema.py).
        from boat_tools.ema import is_ema_hook  # registers TTAEMAHook
        for hook in cfg.get('custom_hooks') or []:
            if is_ema_hook(hook.get('type')):
                hook['type'] = 'TTAEMAHook'
        if 'tta_pipeline' not in cfg:
            pipeline = _test_dataset(cfg).pipeline
            cfg.tta_pipeline = deepcopy(pipeline)
            cfg.tta_pipeline[-1] = dict(
                type='TestTimeAug',
                transforms=[[
                    dict(type='RandomFlip', prob=1.),
                    dict(type='RandomFlip', prob=0.)
                ], [pipeline[-1]]])
    missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
    if missing:
        raise UsageError(
            f'--tta needs {missing} in the config (mmseg configs inherit '
            f'them from mmseg::_base_/default_runtime.py and the dataset '
            f'base).')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    # The dataset inside the wrappers (RepeatDataset, ClassBalancedDataset,
    # ...), which take no pipeline; as mmdet's test tool.
    _test_dataset(cfg).pipeline = cfg.tta_pipeline


def check_out(out: str, scope: str, out_item: Optional[str]) -> None:
    """Check ``--out`` for what the config's scope writes there, before
    the test: the predictions are pickled (MMEngine's ``DumpResults``,
    mmdet's ``DumpDetResults``), mmpretrain's metrics go through
    ``mmengine.dump`` (format by ending) and mmseg's label maps into a
    folder.

    Args:
        out (str): ``--out``.
        scope (str): The config's ``default_scope``.
        out_item (str, optional): ``--out-item`` (mmpretrain).
    """
    if scope == 'mmseg':
        return
    from mmengine.fileio.handlers import file_handlers
    pickle = ('.pkl', '.pickle')
    if scope == 'mmpretrain' and out_item == 'metrics':
        endings = tuple(f'.{name}' for name in file_handlers)
        what = 'a file of the metrics'
    else:
        endings = pickle
        what = 'a pickle file of the predictions'
    hint = (' (for the metrics in a .json file, add --out-item metrics)'
            if scope == 'mmpretrain' and out_item != 'metrics' else '')
    if not out.endswith(endings):
        raise UsageError(f'--out of an {scope} config is {what}, ending in '
                         f'{" or ".join(endings)}; got {out!r}{hint}.')


def merge_args(cfg: Config, args: argparse.Namespace) -> Config:
    """Merge the command line into the config (``--cfg-options`` first)."""
    merge_common_args(cfg, args)
    if cfg.get('test_dataloader') is None:
        raise no_test_set(cfg, 'no test_dataloader', 'test.py tests on')
    cfg.load_from = check_checkpoint(args.checkpoint)
    cfg.resume = False
    if args.amp:
        import torch
        if _scope(cfg) == 'mmdet' and not torch.cuda.is_available():
            raise UsageError(
                '--amp of an mmdet config needs a CUDA device (mmcv\'s nms, '
                'which the detectors run, has no bfloat16 kernel on the '
                'CPU); drop --amp to test in float32.')
        cfg.test_cfg = cfg.get('test_cfg') or ConfigDict(type='TestLoop')
        cfg.test_cfg.fp16 = True
    if args.show or args.show_dir:
        _visualization(cfg, args)
    if args.tta:
        _tta(cfg)
    if _scope(cfg) == 'mmpretrain':
        loader = ConfigDict(
            pin_memory=True, collate_fn=dict(type='default_collate'))
        loader.update(cfg.test_dataloader)
        cfg.test_dataloader = loader
    if args.no_pin_memory:
        cfg.test_dataloader.pin_memory = False
    if args.out is not None:
        check_out(args.out, _scope(cfg), args.out_item)
    if args.out is not None and _scope(cfg) == 'mmseg':
        # mmseg's IoUMetric writes the label maps (original ids) there.
        evaluators = cfg.test_evaluator if isinstance(
            cfg.test_evaluator, list) else [cfg.test_evaluator]
        for evaluator in evaluators:
            evaluator['output_dir'] = args.out
            evaluator['keep_results'] = True
    return cfg


@tool_main
def main(argv: Optional[List[str]] = None) -> dict:
    """Run the test; returns the metrics."""
    args = parse_args(argv)
    cfg = merge_args(load_config(args.config, merge_options=False), args)
    check_num_classes(cfg, ('test_dataloader', ))
    check_data_roots(cfg, ('test_dataloader', ))
    adapt_cfg_to_device(cfg)
    init_cpu_dist(cfg)

    runner = build_runner(cfg)
    check_checkpoint_fits(runner, 'checkpoint')
    if args.show_dir and _scope(cfg) == 'mmpretrain':
        _pretrain_show_dir(runner, args.show_dir)

    pretrain_out = args.out and _scope(cfg) == 'mmpretrain'
    if pretrain_out and args.out_item in ('pred', None):
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(
            DumpResults(out_file_path=args.out))
    if args.out and _scope(cfg) == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    if pretrain_out and args.out_item == 'metrics':
        mmengine.dump(metrics, args.out)
    return metrics


if __name__ == '__main__':
    main()
    close_dist()
