# Copyright (c) boat-mm contributors. All rights reserved.
"""Generate a synthetic ADE20K-, ImageNet- or COCO-like dataset.

Examples::

    python tools/dataset_converters/gen_synthetic_data.py ade20k \
        data/ade_synthetic --num-train 200 --num-val 50 --img-size 128
    python tools/dataset_converters/gen_synthetic_data.py imagenet \
        data/imagenet_synthetic --num-train 20 --num-val 5
    python tools/dataset_converters/gen_synthetic_data.py coco \
        data/coco_synthetic --num-train 200 --num-val 50 --img-size 160
"""
import argparse
import os.path as osp
import sys
import time
from typing import List, Optional

from boat_mm.datasets import (generate_ade20k_like, generate_coco_like,
                              generate_imagenet_like)

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import ArgumentParser, UsageError, tool_main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('kind', choices=['ade20k', 'imagenet', 'coco'])
    parser.add_argument('out_dir', help='output folder (must be empty)')
    parser.add_argument(
        '--num-train',
        type=int,
        default=None,
        help='training images (ImageNet-like: per class)')
    parser.add_argument(
        '--num-val',
        type=int,
        default=None,
        help='validation images (ImageNet-like: per class)')
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


@tool_main
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    kwargs = {
        k: v
        for k, v in dict(
            num_train=args.num_train,
            num_val=args.num_val,
            img_size=args.img_size,
            num_classes=args.num_classes,
            seed=args.seed).items() if v is not None
    }
    start = time.time()
    try:
        _generate(args, kwargs)
    except ValueError as err:  # a size or count out of range
        raise UsageError(str(err))
    print(f'done in {time.time() - start:.1f}s')


def _generate(args: argparse.Namespace, kwargs: dict) -> None:
    if args.kind == 'ade20k':
        root = generate_ade20k_like(args.out_dir, **kwargs)
        print(f'ADE20K-like data root: {root}')
    elif args.kind == 'coco':
        root = generate_coco_like(args.out_dir, **kwargs)
        print(f'COCO-like data root: {root}')
    else:
        classes = generate_imagenet_like(args.out_dir, **kwargs)
        print(f'ImageNet-like data in {args.out_dir} ({len(classes)} '
              f'classes)')


if __name__ == '__main__':
    main()
