# Copyright (c) boat-mm contributors. All rights reserved.
"""Draw the feature-space clusters of one FSLA module of a BOAT model.

Builds the model of an mmpretrain, mmseg or mmdet config (chosen by the
config's ``default_scope``), loads a checkpoint, runs an image through the
config's test pipeline (or a plain resize, ``--shape H W``) and the model's
data preprocessor, captures the cluster of every token at the chosen FSLA
module (stage, block, head), and saves the image next to the image
overlaid with one colour per cluster, enlarged by a whole factor to at
least ``--min-width`` (512) pixels, under a title that names the stage,
block and head, the size of the token map and how many clusters split it.

Examples::

    python tools/visualization/vis_clusters.py \\
        configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py demo.jpg \\
        --checkpoint boat-cswin-tiny_in1k.pth --stage 1 --head 2 \\
        --out-file clusters.png
    python tools/visualization/vis_clusters.py CONFIG IMG --shape 448 448
    python tools/visualization/vis_clusters.py \
        configs/boat_swin/mask-rcnn_boat-swin-tiny_fpn_1x_coco.py demo.jpg \
        --checkpoint CKPT --stage 1

FSLA sits in the odd (shifted-window) blocks of stages 0-2 of BOAT-Swin
and in the even blocks of every stage of BOAT-CSWin; a wrong
``--stage``/``--block`` gets the list of those that have it.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Tuple

import cv2
import mmcv
import numpy as np
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import print_log

import boat_mm  # noqa: F401  (registers the BOAT models)
from boat_mm.visualization import (capture_cluster_ids, draw_clusters,
                                   find_fsla_modules, get_boat_backbone)

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (ArgumentParser, UsageError, add_model_args,
                            add_shape_arg, check_checkpoint, check_image,
                            check_output_file, load_config, tool_main)
from boat_tools.inference import build_model as _build_model
from boat_tools.inference import build_pipeline, token_stride

TOOL = 'vis_clusters'


def build_model(cfg: Config,
                checkpoint: Optional[str] = None,
                device: str = 'cpu'):
    """Build the config's model in its scope and load ``checkpoint``
    (:func:`boat_tools.inference.build_model`)."""
    return _build_model(cfg, checkpoint, device, TOOL)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(
        description='Visualise the FSLA clusters of a BOAT backbone')
    parser.add_argument(
        'config', help='mmpretrain, mmseg or mmdet config file')
    parser.add_argument('image', help='image file')
    parser.add_argument(
        '--stage', type=int, default=0, help='stage index (default 0)')
    parser.add_argument(
        '--block',
        type=int,
        help='block index inside the stage (default: its first FSLA block)')
    add_shape_arg(
        parser, 'resize the image to H x W instead of the config\'s test '
        'pipeline resizing')
    # Before --shape (height first, as in the other tools): width first.
    parser.add_argument('--resize', type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        '--alpha',
        type=float,
        default=0.5,
        help='weight of the cluster colours in the overlay')
    parser.add_argument(
        '--out-file',
        default='clusters.png',
        help='output image (default clusters.png)')
    parser.add_argument(
        '--min-width',
        type=int,
        default=512,
        help='the picture is enlarged by a whole factor to at least this '
        'many pixels (default 512)')
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.resize is not None:
        if args.shape is not None:
            parser.error('give --shape H W only (--resize W H is its old '
                         'spelling)')
        args.shape = (args.resize[1], args.resize[0])
    return args


def readable(picture: np.ndarray,
             title: str,
             min_width: int = 512) -> Tuple[np.ndarray, int]:
    """Enlarge ``picture`` by a whole factor (nearest neighbour: each token
    stays a sharp block) to at least ``min_width`` pixels and put
    ``title`` above it.

    Returns:
        tuple[np.ndarray, int]: The picture and the factor.
    """
    scale = max(1, -(-min_width // picture.shape[1]))
    body = np.repeat(np.repeat(picture, scale, 0), scale, 1)
    width = body.shape[1]
    font = cv2.FONT_HERSHEY_SIMPLEX
    size = 0.6
    while size > 0.3 and cv2.getTextSize(title, font, size,
                                         1)[0][0] > width - 16:
        size -= 0.05
    (_, text_h), _ = cv2.getTextSize(title, font, size, 1)
    band = np.full((text_h + 16, width, 3), 255, np.uint8)
    cv2.putText(band, title, (8, text_h + 8), font, size, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([band, body], axis=0), scale


@tool_main
def main(argv: Optional[List[str]] = None) -> dict:
    """Run the tool; returns ``ids`` (the ``(H_s, W_s)`` id map drawn),
    ``image`` (what the model saw, ``(H, W, 3)`` BGR), ``location`` and
    ``out_file``."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    check_image(args.image)
    check_output_file(args.out_file, '--out-file', 'clusters.png')
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    # Before the model is built: a config without a test pipeline fails.
    pipeline = build_pipeline(cfg, args.shape, TOOL)
    model = build_model(cfg, args.checkpoint, args.device)
    backbone = get_boat_backbone(model)

    modules = find_fsla_modules(backbone)
    block = args.block
    if block is None:
        # The stage's first FSLA block, if any; else let the capture's
        # error list the blocks that have FSLA.
        blocks = [j for i, j in modules if i == args.stage]
        block = blocks[0] if blocks else 0
    location = (args.stage, block)
    if location not in modules:
        where = ', '.join(f'(stage {i}, block {j})'
                          for i, j in sorted(modules))
        raise UsageError(
            f'Stage {args.stage}, block {block} has no FSLA module. FSLA '
            f'is in: {where}; choose one with --stage and --block.')
    heads = modules[location].num_heads
    if not 0 <= args.head < heads:
        raise UsageError(f'--head {args.head} is out of range: FSLA at stage '
                         f'{args.stage}, block {block} has {heads} heads.')

    data = pipeline(dict(img_path=args.image))
    batch = model.data_preprocessor(pseudo_collate([data]), False)
    ids = capture_cluster_ids(model, batch['inputs'],
                              [location])[location][0, args.head]

    image = np.ascontiguousarray(data['inputs'].permute(1, 2, 0).numpy())
    picture = draw_clusters(
        image,
        ids,
        alpha=args.alpha,
        stride=token_stride(backbone, args.stage))
    num = len(np.unique(ids.numpy()))
    h, w = image.shape[:2]
    # The map's size, then the clusters it is split into (the size read
    # as each cluster's was the old wording's trap).
    title = (f'stage {args.stage}, block {block}, head {args.head}: a '
             f'{ids.shape[0]}x{ids.shape[1]} map ({ids.numel()} tokens) in '
             f'{num} clusters ({h}x{w} input)')
    picture, scale = readable(picture, title, args.min_width)
    mmcv.imwrite(picture, args.out_file)
    print_log(
        f'Saved {args.out_file} ({picture.shape[1]}x{picture.shape[0]} px, '
        f'image | clusters, drawn {scale}x): {title}.',
        logger='current')
    return dict(
        ids=ids.numpy(),
        image=image,
        location=location,
        out_file=args.out_file,
        title=title,
        scale=scale)


if __name__ == '__main__':
    main()
