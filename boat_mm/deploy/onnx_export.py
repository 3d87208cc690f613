# Copyright (c) boat-mm contributors. All rights reserved.
"""Export of classifiers and segmentors to ONNX and checks of the files.

The library behind ``tools/deployment/pytorch2onnx.py`` (see its docstring
and ``docs/deployment.md``): :class:`ExportWrapper` is the tensor-in,
tensor-out network that is exported, :func:`export_onnx` writes it with
torch's dynamo exporter (FSLA's ``'auto'`` implementations take tensor ops
under export, so the graph has standard ONNX ops only), and
:func:`verify` compares onnxruntime with PyTorch. :class:`WithClusters`
also outputs (or injects) FSLA's clusters, through
:meth:`~boat_mm.models.utils.FeatureSpaceLocalAttention.register_cluster_hook`.

Not imported by ``import boat_mm``; onnxruntime is imported when a file is
run.
"""
import contextlib
import importlib
import os
import os.path as osp
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from torch import Tensor

from boat_mm.models.utils import FeatureSpaceLocalAttention

__all__ = [
    'SCOPES', 'MIN_OPSET', 'DYNAMIC_AXES', 'ScopeError', 'ModelKindError',
    'build_model', 'check_exportable', 'converts_to_rgb', 'check_fsla_impls',
    'check_dynamic', 'ExportWrapper', 'WithClusters', 'linear_time_rewrites',
    'export_onnx', 'load_image', 'normalisation', 'input_description',
    'make_session', 'run_onnxruntime', 'compare', 'verify'
]

# The scopes whose models export: the classifiers and the segmentors.
SCOPES = ('mmpretrain', 'mmseg')
# The dynamo exporter (torch.export + onnxscript) emits opset 18 or later.
MIN_OPSET = 18
DYNAMIC_AXES = ('batch', 'height', 'width')


class ScopeError(ValueError):
    """A config whose ``default_scope`` has no exportable models."""


class ModelKindError(ValueError):
    """A model that is not one that exports: an mmpretrain
    ``ImageClassifier`` with a head or an mmseg ``EncoderDecoder``."""


# The fine-tuning configs of ours that a pre-training error names.
FINE_TUNE_CFGS = 'configs/boat_*/boat-*_simmim-100e-pre_*.py'
_EXPORTS = ('pytorch2onnx.py exports an mmpretrain ImageClassifier with a '
            'head (class logits) or an mmseg EncoderDecoder segmentor '
            '(per-pixel class logits)')


def check_exportable(model: nn.Module, scope: str) -> None:
    """Raise a :class:`ModelKindError` unless ``model`` is what the
    export of ``scope`` documents: the class logits of an mmpretrain
    ``ImageClassifier`` with a head, or the per-pixel class logits of an
    mmseg ``EncoderDecoder`` (or a subclass, but not ``DepthEstimator``).

    Decided on the built model, not on the config's name: a SimMIM
    pre-training model or a headless classifier output features, which
    the tool would otherwise export and label as logits.

    Args:
        model (nn.Module): The built model.
        scope (str): ``'mmpretrain'`` or ``'mmseg'``.
    """
    name = type(model).__name__
    if scope == 'mmpretrain':
        from mmpretrain.models import BaseSelfSupervisor, ImageClassifier
        if isinstance(model, ImageClassifier) and model.with_head:
            return
        if isinstance(model, BaseSelfSupervisor):
            raise ModelKindError(
                f'the config builds a {name}, a self-supervised '
                f'pre-training model whose output is features (the '
                f'backbone\'s feature map), not class logits; '
                f'{_EXPORTS}: export the fine-tuned classifier config '
                f'instead, with its fine-tuned checkpoint (ours: '
                f'{FINE_TUNE_CFGS}).')
        if isinstance(model, ImageClassifier):
            raise ModelKindError(
                f'the config builds an {name} without a head (model.head '
                f'is None), whose output is the backbone\'s (or neck\'s) '
                f'features, not class logits; {_EXPORTS}: give the config '
                f'a classification head, e.g. model.head=dict('
                f'type=\'LinearClsHead\', num_classes=..., '
                f'in_channels=...) as in configs/boat_*/*_in1k.py.')
    else:
        from mmseg.models.segmentors import DepthEstimator, EncoderDecoder
        if (isinstance(model, EncoderDecoder)
                and not isinstance(model, DepthEstimator)):
            return
    raise ModelKindError(
        f'the config (default_scope={scope!r}) builds a {name}, which is '
        f'not exported; {_EXPORTS}: give a classification or segmentation '
        f'config (configs/boat_*/*_in1k.py, '
        f'configs/boat_*/*_ade20k-512x512.py).')


def build_model(cfg: Config,
                checkpoint: Optional[str] = None) -> Tuple[nn.Module, str]:
    """Build the inference model of a config, in eval mode on the CPU.

    Args:
        cfg (Config): An mmpretrain or mmseg config.
        checkpoint (str, optional): Weights to load (strictly).

    Returns:
        tuple[nn.Module, str]: The model and its scope.

    Raises:
        ScopeError: The config's ``default_scope`` is not in
            :data:`SCOPES`.
        ModelKindError: The model is not one that exports
            (:func:`check_exportable`).
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ScopeError(
            f'pytorch2onnx.py exports mmpretrain classifiers and mmseg '
            f'segmentors (by the config\'s `default_scope`), got '
            f'default_scope={scope!r}: give a classification or '
            f'segmentation config (configs/boat_*/*_in1k.py, '
            f'configs/boat_*/*_ade20k-512x512.py); detectors are not '
            f'exported by this tool.')
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    model_cfg = cfg.model.copy()
    # As MMEngine's Runner: mmpretrain configs set it at the top level.
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = registry.build(model_cfg)
    # Before loading weights: a pre-training checkpoint loads fine.
    check_exportable(model, scope)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None):
        model.auxiliary_head = None  # training only
    # SyncBN needs a process group; in eval mode it is a plain BN.
    model = revert_sync_batchnorm(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.cpu().eval(), scope


def check_fsla_impls(model: nn.Module) -> None:
    """Raise a ValueError if an FSLA module of ``model`` has a kernel
    implementation: only ``'auto'`` and ``'tensor'`` export.

    Args:
        model (nn.Module): The model to export.
    """
    for name, module in model.named_modules():
        if not isinstance(module, FeatureSpaceLocalAttention):
            continue
        for arg in ('clustering_impl', 'attention_impl'):
            impl = getattr(module, arg)
            if impl not in ('auto', 'tensor'):
                raise ValueError(
                    f'{name} has {arg}={impl!r}, a kernel that ONNX cannot '
                    f'express; export with {arg}=\'auto\' (the default; '
                    f'it takes tensor ops under export) or \'tensor\', '
                    f'e.g. --cfg-options model.backbone.fsla_cfg.{arg}=auto.')


class ExportWrapper(nn.Module):
    """The tensor-in, tensor-out network that is exported.

    Args:
        model (nn.Module): An mmpretrain ``ImageClassifier`` with a head
            or an mmseg ``EncoderDecoder``; others raise a
            :class:`ModelKindError` (:func:`check_exportable`).
        scope (str): ``'mmpretrain'`` or ``'mmseg'``.
    """

    def __init__(self, model: nn.Module, scope: str) -> None:
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f'scope must be one of {list(SCOPES)}, got '
                             f'{scope!r}.')
        check_exportable(model, scope)
        self.model, self.scope = model, scope

    def forward(self, x: Tensor) -> Tensor:
        """Forward.

        Args:
            x (Tensor): ``(N, 3, H, W)`` normalised images.

        Returns:
            Tensor: Logits: ``(N, num_classes)`` of a classifier,
            ``(N, num_classes, H, W)`` of a segmentor.
        """
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
        """Run the network, recording (or injecting) the clusters.

        Args:
            x (Tensor): The network's input.

        Returns:
            tuple[Tensor]: ``(out, perm_1, ..., perm_k)``.
        """
        perms: List[Tensor] = []

        def hook(module: nn.Module, perm: Tensor) -> Optional[Tensor]:
            if self.inject is not None:
                perm = self.inject[len(perms)]
            perms.append(perm)
            return perm

        handles = [m.register_cluster_hook(hook) for m in self.fslas]
        try:
            out = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        return (out, *perms)


def check_dynamic(dynamic: Sequence[str]) -> bool:
    """Whether the batch axis is dynamic; a ValueError for the others.

    Args:
        dynamic (Sequence[str]): Axes from :data:`DYNAMIC_AXES`.

    Returns:
        bool: True if ``'batch'`` is among them.
    """
    unknown = [a for a in dynamic if a not in DYNAMIC_AXES]
    if unknown:
        raise ValueError(f'unknown dynamic axes {unknown}; choose from '
                         f'{list(DYNAMIC_AXES)}.')
    spatial = [a for a in DYNAMIC_AXES[1:] if a in dynamic]
    if spatial:
        raise ValueError(
            f'a dynamic {" and ".join(spatial)} is not supported: FSLA\'s '
            f'cluster layout (number of clusters, slots per cluster, '
            f'attention masks) is computed from the number of tokens '
            f'N = H * W of each stage, so H and W are fixed in the graph. '
            f'Export one file per input size (--shape H W); only the batch '
            f'can be dynamic (--dynamic-shape batch).')
    return 'batch' in dynamic


# linear_time_rewrites swaps a module global of onnxscript: one block at a
# time in the process (re-entrant in a thread).
_RULES_LOCK = threading.RLock()


@contextlib.contextmanager
def linear_time_rewrites() -> Iterator[None]:
    """Within the block, torch's graph optimizer skips ``SlicesSplit``.

    That is onnxscript's default rewrite rule of two Slices of one tensor
    to one Split, its one default rule with two output nodes, which
    onnxscript 0.7 matches by walking the whole graph for every Slice:
    time quadratic in the graph. BOAT's graphs have hundreds of Slices
    among thousands of nodes, and the rule took most of the export time,
    to rewrite nothing there: the benchmark of ``docs/deployment.md``
    checks that the graphs with and without it are the same. Elsewhere, a
    Split it would have written stays two Slices of the same values. All
    other rules run as before.

    The rule is taken out of onnxscript's default list and put back
    after the block, also on an error; other threads wait for the block
    to end. Where onnxscript keeps its rules otherwise (another version),
    the block changes nothing.
    """
    with _RULES_LOCK:
        try:
            from onnxscript import rewriter
            from onnxscript.rewriter.rules.common import slice_split_rule
        except ImportError:
            rewriter = None
        rules = getattr(rewriter, '_DEFAULT_REWRITE_RULES', None)
        if not isinstance(rules, tuple):
            yield
            return
        rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules
                                                if r is not slice_split_rule)
        try:
            yield
        finally:
            rewriter._DEFAULT_REWRITE_RULES = rules


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
            folding, fusions), without its quadratic rule
            (:func:`linear_time_rewrites`). Defaults to True.

    Returns:
        str: ``out``.
    """
    check_fsla_impls(wrapper)
    dynamic_batch = check_dynamic(dynamic)
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
    with torch.no_grad(), linear_time_rewrites():
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
        raise FileNotFoundError(
            f'cannot read image {path!r}: OpenCV reads no image from it; '
            f'pass an image file (.jpg, .png, ...).')
    img = cv2.resize(
        img, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
    mean, std, rgb = normalisation(model)
    if rgb:
        img = img[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    return ((x - mean) / std).unsqueeze(0)


def _normalises(model: nn.Module) -> bool:
    """Whether the model's data preprocessor normalises: mmpretrain's and
    mmseg's have ``mean`` and ``std`` buffers only when they do (the
    config gave them)."""
    return hasattr(model.data_preprocessor, 'mean')


# Where each data preprocessor stores whether it swaps the channels:
# mmpretrain's ClsDataPreprocessor (and its video and multi-modal ones)
# `to_rgb`; mmseg's SegDataPreProcessor `channel_conversion`; MMEngine's
# ImgDataPreprocessor `_channel_conversion`, and so its subclasses, among
# them mmpretrain's SelfSupDataPreprocessor (whose `to_rgb` argument sets
# it) and mmdet's DetDataPreprocessor.
_CHANNEL_SWAP_ATTRS = ('to_rgb', 'channel_conversion', '_channel_conversion')


def converts_to_rgb(data_preprocessor: nn.Module) -> bool:
    """Whether a data preprocessor swaps the channels of the BGR images
    that mmcv loads, i.e. whether the network sees RGB.

    ``bgr_to_rgb`` and ``rgb_to_bgr`` are one flag in MMEngine and mmseg
    (both reverse the channels), so either makes BGR images RGB.

    Args:
        data_preprocessor (nn.Module): An mmpretrain, mmseg or MMEngine
            data preprocessor; one with none of their flags (MMEngine's
            ``BaseDataPreprocessor``) does not convert.

    Returns:
        bool: True if the network sees RGB.
    """
    return any(
        bool(getattr(data_preprocessor, attr, False))
        for attr in _CHANNEL_SWAP_ATTRS)


def normalisation(model: nn.Module) -> Tuple[Tensor, Tensor, bool]:
    """The normalisation of the model's data preprocessor.

    Args:
        model (nn.Module): An mmpretrain or mmseg model.

    Returns:
        tuple[Tensor, Tensor, bool]: ``(3, 1, 1)`` mean and std (0 and 1
        without normalisation) and whether BGR inputs become RGB.
    """
    dp = model.data_preprocessor
    rgb = converts_to_rgb(dp)
    if not _normalises(model):
        return torch.zeros(3, 1, 1), torch.ones(3, 1, 1), rgb
    return dp.mean.cpu().view(-1, 1, 1), dp.std.cpu().view(-1, 1, 1), rgb


def input_description(model: nn.Module) -> str:
    """What the exported graph takes, as the model's data preprocessor
    makes it from an image: the channel order and the normalisation.

    Args:
        model (nn.Module): An mmpretrain or mmseg model.

    Returns:
        str: E.g. ``'RGB channels, minus mean [123.675, 116.28, 103.53],
        divided by std [58.395, 57.12, 57.375]'``.
    """
    mean, std, rgb = normalisation(model)
    order = 'RGB' if rgb else 'BGR'
    if not _normalises(model):
        # Not "minus 0, divided by 1": a user would look for the numbers.
        return (f'{order} channels, pixel values as read (0-255), not '
                f'normalised: the config\'s data_preprocessor has no mean '
                f'and std')
    return (f'{order} channels, minus mean '
            f'{[round(v, 3) for v in mean.flatten().tolist()]}, divided by '
            f'std {[round(v, 3) for v in std.flatten().tolist()]}')


def make_session(path: str, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of an exported file.

    Warnings are not logged.

    Args:
        path (str): The ``.onnx`` file.
        threads (int, optional): Intra-op threads; onnxruntime's default
            if None.

    Returns:
        onnxruntime.InferenceSession: The session.
    """
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

    Args:
        ref (Tensor): PyTorch's output.
        out (np.ndarray): onnxruntime's output, of the same shape.

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
