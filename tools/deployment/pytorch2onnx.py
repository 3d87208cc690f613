# Copyright (c) boat-mm contributors. All rights reserved.
"""Export a classifier or a segmentor built from a config to ONNX.

The exported graph is the network only, on a normalised ``N x 3 x H x W``
float32 input (subtract the config's ``data_preprocessor`` mean, divide by
its std, channels in the order it expects; ``--verify`` shows how):

* classification (mmpretrain ``default_scope``): the class logits
  ``(N, num_classes)`` of backbone + neck + head, before the softmax;
* segmentation (mmseg): per-pixel class logits ``(N, num_classes, H, W)``
  of backbone + decode head, ``whole`` inference (one pass over the whole
  input, logits resized to it), no test-time augmentation; the auxiliary
  head is left out, as at test time.

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
import os
import os.path as osp
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from torch import Tensor

import boat_mm  # noqa: F401  (registers the BOAT models)
from boat_mm.models.utils import FeatureSpaceLocalAttention

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (  # noqa: E402
    ArgumentParser, UsageError, add_shape_arg, check_checkpoint, check_file,
    load_config, tool_main)
from boat_tools.config import add_cfg_options_arg  # noqa: E402

SCOPES = {'mmpretrain': 'mmpretrain.registry', 'mmseg': 'mmseg.registry'}
# The dynamo exporter (torch.export + onnxscript) emits opset 18 or later.
MIN_OPSET = 18
DYNAMIC_AXES = ('batch', 'height', 'width')

__all__ = [
    'build_model', 'ExportWrapper', 'WithClusters', 'export_onnx',
    'load_image', 'make_session', 'run_onnxruntime', 'compare', 'verify'
]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(
        description='Export an mmpretrain classifier or an mmseg segmentor '
        'built from a config to ONNX')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--checkpoint', help='checkpoint to load (random weights without)')
    add_shape_arg(
        parser, 'the input size the network sees (fixed in the file)',
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


def build_model(cfg: Config,
                checkpoint: Optional[str] = None) -> Tuple[nn.Module, str]:
    """Build the inference model of a config, in eval mode on the CPU.

    Args:
        cfg (Config): An mmpretrain or mmseg config.
        checkpoint (str, optional): Weights to load.

    Returns:
        tuple[nn.Module, str]: The model and its scope.
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise UsageError(
            f'pytorch2onnx.py exports mmpretrain classifiers and mmseg '
            f'segmentors (by the config\'s `default_scope`), got '
            f'default_scope={scope!r}.')
    init_default_scope(scope)
    registry = __import__(SCOPES[scope], fromlist=['MODELS']).MODELS
    model_cfg = cfg.model.copy()
    # As MMEngine's Runner: mmpretrain configs set it at the top level.
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = registry.build(model_cfg)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None):
        model.auxiliary_head = None  # training only
    # SyncBN needs a process group; in eval mode it is a plain BN.
    model = revert_sync_batchnorm(model)
    if checkpoint is not None:
        load_checkpoint(
            model, check_checkpoint(checkpoint), map_location='cpu',
            strict=True)
    return model.cpu().eval(), scope


def _check_fsla_impls(model: nn.Module) -> None:
    """Only FSLA's ``'auto'`` and ``'tensor'`` implementations export."""
    for name, module in model.named_modules():
        if not isinstance(module, FeatureSpaceLocalAttention):
            continue
        for arg in ('clustering_impl', 'attention_impl'):
            impl = getattr(module, arg)
            if impl not in ('auto', 'tensor'):
                raise UsageError(
                    f'{name} has {arg}={impl!r}, a kernel that ONNX cannot '
                    f'express; export with {arg}=\'auto\' (the default; '
                    f'it takes tensor ops under export) or \'tensor\', '
                    f'e.g. --cfg-options model.backbone.fsla_cfg.{arg}=auto.')


class ExportWrapper(nn.Module):
    """The tensor-in, tensor-out network that is exported.

    Args:
        model (nn.Module): An mmpretrain classifier or an mmseg
            ``EncoderDecoder``.
        scope (str): ``'mmpretrain'`` or ``'mmseg'``.
    """

    def __init__(self, model: nn.Module, scope: str) -> None:
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f'scope must be one of {list(SCOPES)}, got '
                             f'{scope!r}.')
        self.model, self.scope = model, scope

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` normalised images to logits."""
        if self.scope == 'mmpretrain':
            return self.model(x, mode='tensor')
        # `whole` inference: the decode head's logits resized to the input.
        hw = tuple(x.shape[-2:])
        metas = [dict(img_shape=hw, ori_shape=hw, pad_shape=hw)]
        return self.model.encode_decode(x, metas)


class WithClusters(nn.Module):
    """A network whose outputs also hold every FSLA layer's clusters.

    For checking an export: outputs are ``(out, perm_1, ..., perm_k)``, one
    ``perm`` (see :func:`boat_mm.ops.balanced_hierarchical_clustering`) per
    FSLA call that clusters (maps of one cluster have none). With
    ``inject`` set to such a list, PyTorch uses those clusters instead of
    computing its own, e.g. onnxruntime's, to tell a flipped near-tie from
    an error elsewhere.

    Args:
        net (nn.Module): The network, e.g. an :class:`ExportWrapper`.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.fslas = [
            m for m in net.modules()
            if isinstance(m, FeatureSpaceLocalAttention)
        ]
        self.inject: Optional[List[torch.Tensor]] = None

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        perms = []

        def make(m):

            def cluster(qkv, plan):
                if self.inject is not None:
                    perm = self.inject[len(perms)]
                else:
                    perm = FeatureSpaceLocalAttention._cluster(m, qkv, plan)
                perms.append(perm)
                return perm

            return cluster

        for m in self.fslas:
            m._cluster = make(m)
        try:
            out = self.net(x)
        finally:
            for m in self.fslas:
                del m._cluster
        return (out, *perms)


def _check_dynamic(dynamic: Sequence[str]) -> bool:
    """Whether the batch axis is dynamic; errors for the other axes."""
    unknown = [a for a in dynamic if a not in DYNAMIC_AXES]
    if unknown:
        raise UsageError(f'unknown dynamic axes {unknown}; choose from '
                         f'{list(DYNAMIC_AXES)}.')
    spatial = [a for a in DYNAMIC_AXES[1:] if a in dynamic]
    if spatial:
        raise UsageError(
            f'a dynamic {" and ".join(spatial)} is not supported: FSLA\'s '
            f'cluster layout (number of clusters, slots per cluster, '
            f'attention masks) is computed from the number of tokens '
            f'N = H * W of each stage, so H and W are fixed in the graph. '
            f'Export one file per input size (--shape H W); only the batch '
            f'can be dynamic (--dynamic-shape batch).')
    return 'batch' in dynamic


def export_onnx(wrapper: nn.Module,
                shape: Sequence[int],
                out: str,
                dynamic: Sequence[str] = (),
                opset: Optional[int] = None,
                batch_size: int = 1,
                optimize: bool = True) -> str:
    """Export ``wrapper`` on a ``(batch_size, 3, H, W)`` input to ``out``.

    Args:
        wrapper (nn.Module): Usually an :class:`ExportWrapper`.
        shape (Sequence[int]): ``(H, W)``, fixed in the file.
        out (str): Output file.
        dynamic (Sequence[str]): Dynamic input axes: ``()`` (the default)
            or ``('batch', )``; ``'height'`` and ``'width'`` raise a
            ValueError (see the module docstring).
        opset (int, optional): ONNX opset; the exporter's default if None.
        batch_size (int): Batch of the example input, fixed in the file
            unless the batch is dynamic (then at least 2 is traced: the
            exporter would specialise a batch of 1).
        optimize (bool): Run the exporter's graph optimizer (constant
            folding, fusions). Defaults to True.

    Returns:
        str: ``out``.
    """
    _check_fsla_impls(wrapper)
    dynamic_batch = _check_dynamic(dynamic)
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f'opset must be >= {MIN_OPSET}, got {opset}.')
    H, W = (int(s) for s in shape)
    if dynamic_batch:
        batch_size = max(batch_size, 2)
    x = torch.randn(batch_size, 3, H, W)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim('batch', min=1)}, )
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper.eval(), (x, ),
            dynamo=True,
            opset_version=opset,
            input_names=['input'],
            dynamic_shapes=dynamic_shapes,
            optimize=optimize,
            verbose=False)
    program.save(out, external_data=False)
    return out


def load_image(path: str, model: nn.Module, shape: Sequence[int]) -> Tensor:
    """Read an image, resize it to ``shape`` and normalise it as the model's
    data preprocessor does: the input the exported graph expects.

    Args:
        path (str): Image file.
        model (nn.Module): The model (its ``data_preprocessor``).
        shape (Sequence[int]): ``(H, W)``.

    Returns:
        Tensor: ``(1, 3, H, W)`` float32.
    """
    img = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, as mmcv loads it
    if img is None:
        raise FileNotFoundError(f'cannot read image {path!r}.')
    img = cv2.resize(
        img, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
    mean, std, rgb = _normalisation(model)
    if rgb:
        img = img[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    return ((x - mean) / std).unsqueeze(0)


def _normalisation(model: nn.Module) -> Tuple[Tensor, Tensor, bool]:
    """``(mean, std, to_rgb)`` of the model's data preprocessor."""
    dp = model.data_preprocessor
    rgb = bool(getattr(dp, 'channel_conversion', getattr(dp, 'to_rgb', False)))
    if not hasattr(dp, 'mean'):  # normalisation off
        return torch.zeros(3, 1, 1), torch.ones(3, 1, 1), rgb
    return dp.mean.cpu().view(-1, 1, 1), dp.std.cpu().view(-1, 1, 1), rgb


def make_session(path: str, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of ``path`` (``threads``: intra-op
    threads, onnxruntime's default if None); warnings are not logged."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            'running ONNX files needs onnxruntime: pip install -r '
            'requirements/optional.txt') from e
    opts = ort.SessionOptions()
    # Warnings about nodes its constant folding skips are noise here.
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def run_onnxruntime(path: str,
                    x: Tensor,
                    session: Optional[Any] = None) -> np.ndarray:
    """Run an exported file with onnxruntime (CPU) on ``x``.

    Args:
        path (str): The ``.onnx`` file.
        x (Tensor): ``(N, 3, H, W)`` input of the exported size.
        session (onnxruntime.InferenceSession, optional): Reused if given.

    Returns:
        np.ndarray: The first output.
    """
    if session is None:
        session = make_session(path)
    inp = session.get_inputs()[0]
    fixed = [d if isinstance(d, int) else None for d in inp.shape]
    if fixed[2:] != list(x.shape[2:]):
        raise ValueError(
            f'{path} was exported for {fixed[2]}x{fixed[3]} inputs, got '
            f'{tuple(x.shape[2:])}: the H and W of an export are fixed '
            f'(FSLA\'s cluster layout depends on the number of tokens). '
            f'Resize the input, or export another file with --shape '
            f'{x.shape[2]} {x.shape[3]}.')
    if fixed[0] is not None and fixed[0] != x.shape[0]:
        raise ValueError(
            f'{path} was exported for batch {fixed[0]}, got {x.shape[0]}; '
            f'run the samples one batch of {fixed[0]} at a time, or export '
            f'with a dynamic batch (--dynamic-shape).')
    return session.run(None, {inp.name: x.numpy()})[0]


def compare(ref: Tensor, out: np.ndarray) -> Dict[str, float]:
    """Differences of onnxruntime's ``out`` from PyTorch's ``ref``.

    Returns:
        dict: ``max_abs``; ``rel`` = max |out - ref| / max |ref|; ``argmax``
        = share of equal argmaxes over the class axis (1): top-1 labels of a
        classifier, pixels of a segmentation map.
    """
    out = torch.from_numpy(out)
    if out.shape != ref.shape:
        raise ValueError(f'onnxruntime gave shape {tuple(out.shape)}, '
                         f'PyTorch {tuple(ref.shape)}.')
    diff = (out - ref).abs().max().item()
    same = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    return dict(
        max_abs=diff,
        rel=diff / max(ref.abs().max().item(), 1e-30),
        argmax=same)


def _generated_image(scope: str, folder: str) -> str:
    """One validation image of the generated dataset of the task."""
    from boat_mm.datasets import generate_ade20k_like, generate_imagenet_like
    if scope == 'mmseg':
        root = generate_ade20k_like(
            folder, num_train=0, num_val=1, progress=False)
        return osp.join(root, 'images', 'validation', 'ADE_val_00000000.jpg')
    classes = generate_imagenet_like(
        folder, num_train=0, num_val=1, progress=False)
    return osp.join(folder, 'val', classes[0], f'{classes[0]}_00000.JPEG')


def verify(path: str,
           wrapper: ExportWrapper,
           shape: Sequence[int],
           image: Optional[str] = None,
           seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Compare onnxruntime with PyTorch on a real and a random input, and
    on a random batch of 3 if the file's batch is dynamic.

    Args:
        path (str): Exported file.
        wrapper (ExportWrapper): The exported network.
        shape (Sequence[int]): ``(H, W)``.
        image (str, optional): Image file; one of the generated dataset of
            the task if None.
        seed (int): Seed of the random input.

    Returns:
        dict: :func:`compare` results keyed ``'image'``, ``'random'`` and
        ``'random (batch 3)'`` (dynamic batch only).
    """
    with tempfile.TemporaryDirectory() as tmp:
        if image is None:
            image = _generated_image(wrapper.scope, osp.join(tmp, 'data'))
        inputs = dict(image=load_image(image, wrapper.model, shape))
    gen = torch.Generator().manual_seed(seed)
    inputs['random'] = torch.randn(1, 3, *shape, generator=gen)
    session = make_session(path)
    if not isinstance(session.get_inputs()[0].shape[0], int):
        inputs['random (batch 3)'] = torch.randn(3, 3, *shape, generator=gen)
    results = {}
    for name, x in inputs.items():
        with torch.no_grad():
            ref = wrapper(x)
        results[name] = compare(ref, run_onnxruntime(path, x, session))
    return results


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    _check_dynamic(args.dynamic_shape or ())
    if args.image is not None:
        check_file(args.image, 'image', 'pass an image file for --verify')
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    model, scope = build_model(cfg, args.checkpoint)
    wrapper = ExportWrapper(model, scope)
    t0 = time.perf_counter()
    dynamic = args.dynamic_shape or ()
    export_onnx(wrapper, args.shape, args.out, dynamic, args.opset)
    size = osp.getsize(args.out) / 2**20
    what = 'class logits (N, classes)' if scope == 'mmpretrain' else \
        'per-pixel class logits (N, classes, H, W)'
    batch = 'dynamic' if dynamic else '1'
    print(f'exported {args.out} ({size:.1f} MiB) in '
          f'{time.perf_counter() - t0:.1f} s: input (N, 3, {args.shape[0]}, '
          f'{args.shape[1]}) normalised, N {batch}; output {what}.')
    mean, std, rgb = _normalisation(model)
    order = 'RGB' if rgb else 'BGR'
    print(f'input: {order} channels, minus mean '
          f'{[round(v, 3) for v in mean.flatten().tolist()]}, divided by '
          f'std {[round(v, 3) for v in std.flatten().tolist()]}')
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
