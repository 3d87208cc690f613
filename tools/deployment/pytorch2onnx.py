# Copyright (c) boat-mm contributors. All rights reserved.
"""Export a classifier or a segmentor built from a config to ONNX.

The exported graph is the network only, on a normalised ``N x 3 x H x W``
float32 input (subtract the config's ``data_preprocessor`` mean, divide by
its std, channels in the order it expects; pixel values as read where it
has no mean and std; the tool prints which, ``--verify`` shows how):

* classification (mmpretrain ``default_scope``): the class logits
  ``(N, num_classes)`` of backbone + neck + head, before the softmax;
* segmentation (mmseg): per-pixel class logits ``(N, num_classes, H, W)``
  of backbone + decode head, ``whole`` inference (one pass over the whole
  input, logits resized to it), no test-time augmentation; the auxiliary
  head is left out, as at test time.

Other models are refused with an error that names them and the fix, e.g.
a SimMIM pre-training config (its output is the backbone's features: export
the fine-tuned classifier config) or a classifier without a head.

Export uses torch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnxscript``). FSLA becomes standard ONNX ops: under export
its ``'auto'`` implementations take the tensor path (MatMul, TopK, Gather,
ScatterElements, Softmax), so no custom op is in the graph and any ONNX
runtime runs it.

Shapes: ``H x W`` are fixed at export time for every model (any size works,
no multiple of 32 needed): FSLA's cluster layout (number of clusters, slots
per cluster, masks) is computed from the number of tokens ``N`` of each
stage, so a file serves one input size; export one file per size.
``--dynamic-shape`` makes the batch axis dynamic (every sample is clustered
on its own, so the layout does not depend on the batch); a dynamic height
or width (``--dynamic-shape height width``) is refused with an error.

The export and the checks are :mod:`boat_mm.deploy.onnx_export`; this
script is their command line.

``--verify`` runs the file with onnxruntime (CPU) on a real image (one from
the generated dataset of the config's task, or ``--image``) and on random
input (also a batch of 3 if the batch is dynamic), and prints the
differences from PyTorch. Large differences on some inputs can be
float32 near-ties of FSLA's clustering ranked the other way, which
cascade through the following layers (``docs/deployment.md``).

Examples::

    python tools/deployment/pytorch2onnx.py \\
        configs/demo/boat-cswin-tiny_upernet_demo.py \\
        --checkpoint work_dirs/demo/iter_2000.pth \\
        --shape 128 128 --out work_dirs/demo/demo.onnx --verify
    python tools/deployment/pytorch2onnx.py \\
        configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py \\
        --shape 224 224 --out boat-cswin-tiny.onnx --dynamic-shape
"""
import argparse
import os.path as osp
import sys
import time
from typing import List, Optional

import boat_mm  # noqa: F401  (registers the BOAT models)
from boat_mm.deploy.onnx_export import (DYNAMIC_AXES, MIN_OPSET, ExportWrapper,
                                        ModelKindError, ScopeError,
                                        build_model, check_dynamic,
                                        check_fsla_impls, export_onnx,
                                        input_description, load_image, verify)

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (ArgumentParser, UsageError, add_shape_arg,
                            check_checkpoint, check_file, check_output_file,
                            load_config, tool_main)
from boat_tools.config import add_cfg_options_arg


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(
        description='Export an mmpretrain classifier or an mmseg segmentor '
        'built from a config to ONNX')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--checkpoint', help='checkpoint to load (random weights without)')
    add_shape_arg(
        parser,
        'the input size the network sees (fixed in the file)',
        required=True)
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument(
        '--dynamic-shape',
        nargs='*',
        choices=DYNAMIC_AXES,
        metavar='AXIS',
        help='dynamic input axes: alone or "batch", a dynamic batch size; '
        '"height" and "width" are refused (FSLA\'s cluster layout depends '
        'on the number of tokens: export one file per input size)')
    parser.add_argument(
        '--opset',
        type=int,
        default=None,
        help=f'ONNX opset (>= {MIN_OPSET}); the exporter\'s default without')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='run the file with onnxruntime on a real image and on random '
        'input and print the differences from PyTorch')
    parser.add_argument(
        '--image',
        help='image for --verify (default: one generated like the config\'s '
        'dataset)')
    add_cfg_options_arg(parser)
    args = parser.parse_args(argv)
    if args.dynamic_shape is not None and not args.dynamic_shape:
        args.dynamic_shape = ['batch']  # the flag alone
    if args.opset is not None and args.opset < MIN_OPSET:
        parser.error(f'--opset must be >= {MIN_OPSET} (torch\'s ONNX '
                     f'exporter emits opset {MIN_OPSET}+), got {args.opset}')
    return args


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    # Before the export, not after it.
    check_output_file(args.out, '--out',
                      osp.splitext(osp.basename(args.config))[0] + '.onnx')
    try:
        check_dynamic(args.dynamic_shape or ())
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.image is not None:
        check_file(args.image, 'image', 'pass an image file for --verify')
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    try:
        model, scope = build_model(cfg, args.checkpoint)
    except (ScopeError, ModelKindError) as e:
        raise UsageError(str(e)) from None
    wrapper = ExportWrapper(model, scope)
    try:
        check_fsla_impls(wrapper)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.image is not None:
        # A file that is no image fails here, not after the export.
        load_image(args.image, model, args.shape)
    t0 = time.perf_counter()
    dynamic = args.dynamic_shape or ()
    export_onnx(wrapper, args.shape, args.out, dynamic, args.opset)
    size = osp.getsize(args.out) / 2**20
    what = 'class logits (N, classes)' if scope == 'mmpretrain' else \
        'per-pixel class logits (N, classes, H, W)'
    batch = 'dynamic' if dynamic else '1'
    print(f'exported {args.out} ({size:.1f} MiB) in '
          f'{time.perf_counter() - t0:.1f} s: input (N, 3, {args.shape[0]}, '
          f'{args.shape[1]}) float32, N {batch}; output {what}.')
    print(f'input: {input_description(model)}.')
    if args.verify:
        for name, r in verify(args.out, wrapper, args.shape,
                              args.image).items():
            label = 'top-1 equal' if scope == 'mmpretrain' else \
                'pixels with equal class'
            print(f'onnxruntime vs PyTorch, {name} input: max abs diff '
                  f'{r["max_abs"]:.3g}, relative {r["rel"]:.3g}, '
                  f'{label} {100 * r["argmax"]:.2f} %')
    return 0


if __name__ == '__main__':
    sys.exit(main())
