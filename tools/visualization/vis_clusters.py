# Copyright (c) boat-mm contributors. All rights reserved.
"""Draw the feature-space clusters of one FSLA module of a BOAT model.

Builds the model of an mmpretrain, mmseg or mmdet config (chosen by the
config's ``default_scope``), loads a checkpoint, runs an image through the
config's test pipeline (or a plain resize, ``--resize``) and the model's data
preprocessor, captures the cluster of every token at the chosen FSLA module
(stage, block, head), and saves the image next to the image overlaid with
one colour per cluster.

Examples::

    python tools/visualization/vis_clusters.py \\
        configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py demo.jpg \\
        --checkpoint boat-cswin-tiny_in1k.pth --stage 1 --head 2 \\
        --out-file clusters.png
    python tools/visualization/vis_clusters.py CONFIG IMG --resize 448 448
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
from typing import List, Optional

import mmcv
import numpy as np
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import print_log

import boat_mm  # noqa: F401  (registers the BOAT models)
from boat_mm.visualization import (capture_cluster_ids, draw_clusters,
                                   find_fsla_modules, get_boat_backbone)

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.config import add_cfg_options_arg  # noqa: E402
from boat_tools.inference import build_pipeline, token_stride  # noqa: E402
from boat_tools.inference import build_model as _build_model  # noqa: E402

TOOL = 'vis_clusters'


def build_model(cfg: Config,
                checkpoint: Optional[str] = None,
                device: str = 'cpu'):
    """Build the config's model in its scope and load ``checkpoint``
    (:func:`boat_tools.inference.build_model`)."""
    return _build_model(cfg, checkpoint, device, TOOL)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description='Visualise the FSLA clusters of a BOAT backbone')
    parser.add_argument(
        'config', help='mmpretrain, mmseg or mmdet config file')
    parser.add_argument('image', help='image file')
    parser.add_argument('--checkpoint', help='checkpoint file (.pth)')
    parser.add_argument(
        '--stage', type=int, default=0, help='stage index (default 0)')
    parser.add_argument(
        '--block',
        type=int,
        help='block index inside the stage (default: its first FSLA block)')
    parser.add_argument(
        '--head', type=int, default=0, help='attention head (default 0)')
    parser.add_argument(
        '--resize',
        type=int,
        nargs=2,
        metavar=('W', 'H'),
        help='resize the image to W x H instead of the config\'s test '
        'pipeline resizing')
    parser.add_argument(
        '--alpha',
        type=float,
        default=0.5,
        help='weight of the cluster colours in the overlay')
    parser.add_argument(
        '--out-file',
        default='clusters.png',
        help='output image (default clusters.png)')
    parser.add_argument('--device', default='cpu', help='e.g. cpu, cuda:0')
    add_cfg_options_arg(parser)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the tool; returns ``ids`` (the ``(H_s, W_s)`` id map drawn),
    ``image`` (what the model saw, ``(H, W, 3)`` BGR), ``location`` and
    ``out_file``."""
    args = parse_args(argv)
    if not osp.isfile(args.image):
        raise FileNotFoundError(f'Image {args.image!r} not found.')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
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
    # A location without FSLA is reported by the capture, with the list
    # of those that have it; the head is checked here.
    if location in modules:
        heads = modules[location].num_heads
        if not 0 <= args.head < heads:
            raise ValueError(
                f'--head {args.head} is out of range: FSLA at stage '
                f'{args.stage}, block {block} has {heads} heads.')

    data = build_pipeline(cfg, args.resize, TOOL)(
        dict(img_path=args.image))
    batch = model.data_preprocessor(pseudo_collate([data]), False)
    ids = capture_cluster_ids(model, batch['inputs'],
                              [location])[location][0, args.head]

    image = np.ascontiguousarray(data['inputs'].permute(1, 2, 0).numpy())
    picture = draw_clusters(
        image,
        ids,
        alpha=args.alpha,
        stride=token_stride(backbone, args.stage))
    mmcv.imwrite(picture, args.out_file)
    num = int(ids.max()) + 1
    print_log(
        f'Saved {args.out_file}: stage {args.stage}, block {block}, head '
        f'{args.head}: {num} clusters on the {tuple(ids.shape)} token map '
        f'of a {image.shape[1]}x{image.shape[0]} input.',
        logger='current')
    return dict(
        ids=ids.numpy(),
        image=image,
        location=location,
        out_file=args.out_file)


if __name__ == '__main__':
    main()
