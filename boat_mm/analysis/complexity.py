# Copyright (c) boat-mm contributors. All rights reserved.
"""Parameter and FLOP counting for BOAT models, on ``mmengine.analysis``.

``FLOPs`` follow the OpenMMLab / fvcore convention: one multiply-add (MAC)
is one FLOP. Counting is done by mmengine's :class:`FlopAnalyzer` (a
``torch.jit`` trace of one forward pass) with its default handles (linear,
matmul, bmm, conv, einsum, norms, upsampling, ...) plus what it misses in
BOAT:

* **Attention written with** ``F.scaled_dot_product_attention`` **(SDPA)**
  (FSLA, the CSWin stripes): ``q @ k^T`` and ``attn @ v`` cost
  ``pairs * (E + Ev)`` MACs, where ``pairs`` is the number of
  (query, key) pairs and ``E``, ``Ev`` the head dims of q/k and v. Without
  a mask ``pairs = B * heads * Lq * Lk``, i.e. ``2 * B * heads * Lq * Lk *
  head_dim``. Softmax and scaling are element-wise and, as everywhere in
  this convention, not counted.
* **Masked SDPA.** FSLA runs attention on a *pair* of sibling clusters
  (``2S`` slots) with a boolean mask, so each of the 49 queries of a
  cluster sees its own 49 tokens plus 20 of its sibling's (69 keys), as
  the published algorithm, which gathers those 69 keys and runs a dense
  49 x 69 attention. With ``masked_attention='allowed'`` (the default) a
  boolean mask counts only its allowed pairs: the cost of the algorithm,
  independent of how it is implemented. ``'dense'`` counts the full
  ``2S x 2S`` products that a masked kernel executes (for FSLA at
  ``S = 49`` that is ``98 / 69 = 1.42`` times the attention MACs). Padding
  masks (CSWin stripes on maps that are not multiples of the stripe width)
  are treated the same way: padded keys are not counted under
  ``'allowed'``. Float (additive) masks are always counted dense, as
  their "forbidden" entries cannot be told apart.
* **FSLA clustering** (hierarchical spherical k-means on the queries): its
  batched matmuls (centroid means, the cosine similarities of every k-means
  iteration and of the final ranking, centroid updates) are counted
  exactly as its tensor ops execute them (checked against torch's
  ``FlopCounterMode`` by the tests). Per level that is
  ``4 * (1 + kmeans_iters) * B * heads * slots * head_dim`` MACs
  (``12 * B * N * C`` per level with the default two iterations and no
  padding slots). The sorts, gathers and
  normalisations around them are not MACs and are not counted.

Against the published numbers of the original classifiers (224 x 224,
multiply-adds of matmul, linear, conv and bmm; ``Converted From`` in
``configs/*/metafile.yml``, which ``get_flops.py --check-reference``
compares with) this counter is at most 0.1 % higher, for two deliberate
differences in what runs: (1) the original computes each split's initial
centroids with ``Tensor.mean`` (additions, not a matmul), boat-mm with a
batched matmul by an averaging matrix (which handles uneven splits); that
matmul is executed, so it is counted: one sixth of the clustering MACs,
0.006 G (T) to 0.011 G (B). (2) On the 7 x 7 map of BOAT-CSWin's last
stage (one cluster) the original pairs clusters of *different images*, so
every query sees 69 keys, boat-mm's single cluster attends within itself
(49 keys): 0.001-0.0015 G less. Subtracting (1) and adding (2) rounds to
the published value for all six models.

How it works: the trace runs under a torch function mode (this module's, not
a patch: torch calls it for every torch function while it is active, and
nothing outside the trace sees it) that sends every
``scaled_dot_product_attention`` call to a thin custom op
(``boat_mm_flops::sdpa``) computing the same values and carrying its MAC
count, measured on the real tensors (the mask's allowed pairs), as a
constant argument of the traced node. FSLA's ops are traced as the nodes
``boat_mm::balanced_clustering`` and ``boat_mm::clustered_attention`` (or
their ``boat_mm_triton`` twins), whose handles compute the MACs from the
node's shapes and constants: the clustering's matmuls as above, the
attention's allowed (or dense) pairs of the sibling-pair layout (its
tensor-op path, taken where no kernel runs the input, is plain SDPA and
counted as such). Any other ``aten::scaled_dot_product_attention`` node of
the trace is counted dense by its handle; SDPA inside a
``torch.jit.script`` function is not seen (the trace holds a
``prim::CallFunction``).

The handles live in :mod:`boat_mm.analysis.flop_handles`; ``import
boat_mm`` also adds them to mmengine's default handles, so a plain
``mmengine.analysis.get_model_complexity_info`` (the upstream
``get_flops.py`` tools) counts FSLA's ops and SDPA as well: the same total
as here wherever no boolean mask hides pairs (there it counts SDPA dense,
a traced mask being a graph value), without the per-operator report.

Example:
    >>> from boat_mm.analysis.complexity import get_model_complexity
    >>> info = get_model_complexity(model, input_shape=(3, 224, 224))
    >>> info['flops'] / 1e9, info['params'] / 1e6
"""
import contextlib
from collections import Counter
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple, Union)

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer, parameter_count
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .flop_handles import check_masked_attention, flop_handles, sdpa_macs

__all__ = [
    'MAC_OPERATORS', 'DetectorForward', 'flop_analyzer',
    'get_model_complexity', 'sdpa_macs'
]

# Operator names (as reported by ``FlopAnalyzer.by_operator``) that are
# multiply-adds; the others (norms, upsampling, pooling) are mmengine's
# per-element estimates.
MAC_OPERATORS = frozenset({
    'linear', 'addmm', 'mm', 'matmul', 'bmm', 'einsum', 'conv', 'sdpa',
    'fsla_clustering'
})

# Data movement, indexing and comparisons: no arithmetic, so they are
# neither counted nor reported as "not counted".
_ZERO_COST_OPS = ('aten::index_select', 'aten::embedding', 'aten::sort',
                  'aten::argsort', 'aten::scatter', 'aten::scatter_',
                  'aten::scatter_reduce', 'aten::where', 'aten::lt',
                  'aten::le', 'aten::ne', 'aten::numel', 'aten::clone',
                  'aten::repeat', 'aten::expand_as', 'aten::view_as',
                  'aten::unflatten', 'aten::pad', 'aten::new_ones',
                  'aten::ones_like', 'aten::lift_fresh', 'aten::alias',
                  'aten::neg', 'aten::_unsafe_view', 'aten::pixel_shuffle',
                  'aten::fill_', 'aten::zero_', 'aten::logical_and',
                  'aten::logical_or', 'aten::bitwise_and', 'aten::bitwise_or',
                  'aten::all', 'aten::any', 'aten::__or__',
                  'aten::masked_fill_', 'aten::unfold', 'aten::im2col')

# The parameters of F.scaled_dot_product_attention, in order.
_SDPA_ARGS = ('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal',
              'scale', 'enable_gqa')
_SDPA_DEFAULTS = dict(
    attn_mask=None,
    dropout_p=0.,
    is_causal=False,
    scale=None,
    enable_gqa=False)


@torch.library.custom_op('boat_mm_flops::sdpa', mutates_args=())
def _sdpa_op(query: Tensor, key: Tensor, value: Tensor,
             attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
             scale: Optional[float], enable_gqa: bool, macs: int) -> Tensor:
    """SDPA that carries its MAC count (``macs``) into the traced graph."""
    kwargs = dict(enable_gqa=True) if enable_gqa else {}
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        **kwargs)


@contextlib.contextmanager
def _tracing_disabled() -> Iterator[None]:
    """Run eager code inside a ``torch.jit`` trace without recording it."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class _CountingMode(TorchFunctionMode):
    """Sends every ``F.scaled_dot_product_attention`` call of the trace to
    :func:`_sdpa_op`, with its MAC count measured on the call's tensors.

    Args:
        masked_attention (str): ``'allowed'`` or ``'dense'``.
    """

    def __init__(self, masked_attention: str) -> None:
        super().__init__()
        self.masked_attention = masked_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, args)), **kwargs)
        q, k, v, mask = (call[n] for n in _SDPA_ARGS[:4])
        with _tracing_disabled():
            macs = sdpa_macs(
                tuple(q.shape), tuple(k.shape), tuple(v.shape), mask,
                call['is_causal'], self.masked_attention)
        scale = call['scale']
        return _sdpa_op(q, k, v, mask, float(call['dropout_p']),
                        bool(call['is_causal']),
                        None if scale is None else float(scale),
                        bool(call['enable_gqa']), macs)


def _macs_arg_handle(name: str) -> Callable:
    """Handle returning the MAC count carried as the op's last argument."""

    def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
        return Counter({name: int(inputs[-1].toIValue())})

    return handle


def flop_analyzer(model: nn.Module,
                  inputs: Union[Tensor, Tuple[Any, ...]],
                  masked_attention: str = 'allowed') -> FlopAnalyzer:
    """An analysed :class:`mmengine.analysis.FlopAnalyzer` for ``model``.

    The model is traced once, under ``torch.no_grad()``, with the BOAT
    handles of this module (see the module docstring); the result can be
    queried (``total()``, ``by_operator()``, ``by_module()``) and printed
    with mmengine's ``complexity_stats_table`` without tracing again.
    Put the model in eval mode first (dropout, drop path).

    Args:
        model (nn.Module): The model; ``model(*inputs)`` is traced.
        inputs (Tensor | tuple): Input(s) of the forward pass.
        masked_attention (str): How boolean-masked SDPA is counted:
            ``'allowed'`` (allowed pairs only, default) or ``'dense'``.

    Returns:
        FlopAnalyzer: With the statistics computed. Operators that were
        traced but have no FLOP handle are in ``unsupported_ops()``.
    """
    check_masked_attention(masked_attention)
    analyzer = FlopAnalyzer(model, inputs)
    # (PythonOps cannot be ignored by name, as _ZERO_COST_OPS are: mmengine
    # checks the bare kind; flop_handles gives them a zero handle.)
    analyzer.set_op_handle(**flop_handles(masked_attention))
    analyzer.set_op_handle('boat_mm_flops::sdpa', _macs_arg_handle('sdpa'))
    for op in _ZERO_COST_OPS:
        analyzer.set_op_handle(op, None)
    # The caller reports uncounted operators once, summarised.
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad(), _CountingMode(masked_attention):
        analyzer.total()  # traces now, while the mode is active
    return analyzer


def get_model_complexity(model: nn.Module,
                         input_shape: Sequence[int] = (3, 224, 224),
                         inputs: Union[Tensor, Tuple[Any, ...], None] = None,
                         masked_attention: str = 'allowed') -> Dict[str, Any]:
    """Parameters and FLOPs (multiply-adds) of a model for one input.

    Args:
        model (nn.Module): The model (put in eval mode here).
        input_shape (Sequence[int]): ``(C, H, W)`` of a random input with
            batch size 1, used when ``inputs`` is None.
            Defaults to ``(3, 224, 224)``.
        inputs (Tensor | tuple, optional): Explicit input(s).
        masked_attention (str): ``'allowed'`` or ``'dense'``, see the
            module docstring. Defaults to ``'allowed'``.

    Returns:
        dict: ``flops`` (int, all counted operators, the OpenMMLab
        "FLOPs"), ``macs`` (int, only the multiply-add operators of
        :data:`MAC_OPERATORS`, i.e. without mmengine's per-element
        estimates for norms, upsampling and pooling), ``params`` (int, all
        parameters of ``model``), ``by_operator`` (Counter),
        ``uncounted_ops`` (Counter of traced operators without a FLOP
        handle, e.g. element-wise arithmetic and softmax), ``input_shape``
        and ``analyzer`` (the :class:`FlopAnalyzer`).
    """
    if inputs is None:
        if len(input_shape) != 3:
            raise ValueError(f'input_shape must be (C, H, W), got '
                             f'{tuple(input_shape)}.')
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        inputs = (torch.randn(1, *input_shape, device=device), )
    elif isinstance(inputs, Tensor):
        inputs = (inputs, )
    model.eval()
    analyzer = flop_analyzer(model, inputs, masked_attention)
    by_op = analyzer.by_operator()
    return dict(
        flops=int(analyzer.total()),
        macs=int(sum(v for k, v in by_op.items() if k in MAC_OPERATORS)),
        params=int(parameter_count(model)['']),
        by_operator=by_op,
        uncounted_ops=analyzer.unsupported_ops(),
        input_shape=tuple(inputs[0].shape[1:]),
        analyzer=analyzer)


class DetectorForward(nn.Module):
    """An mmdet detector as ``forward(images) -> head outputs``, to count.

    The convention of mmdet's FLOP counts (mmdet 2's ``forward_dummy``,
    used for the published Swin and CSWin detection FLOPs): the backbone,
    the neck and the dense heads on the image; a two-stage detector's RoI
    head on ``num_proposals`` fixed boxes (its mask head on the first 100,
    as mmdet's ``StandardRoIHead.forward``), so the count does not depend
    on what a random RPN proposes. Post-processing (NMS, top-k) is left
    out. Every image of the batch gets the metainfo of an unpadded
    ``H x W`` input.

    Args:
        detector (nn.Module): An mmdet ``SingleStageDetector`` or
            ``TwoStageDetector``.
        num_proposals (int): RoIs per image of a two-stage detector.
            Defaults to 1000 (mmdet's test-time RPN output).
    """

    def __init__(self, detector: nn.Module, num_proposals: int = 1000) -> None:
        super().__init__()
        if not (hasattr(detector, 'roi_head')
                or hasattr(detector, 'bbox_head')):
            raise TypeError(
                f'{type(detector).__name__} is not an mmdet detector with '
                f'an roi_head (two-stage) or a bbox_head (single-stage).')
        self.detector = detector
        self.num_proposals = num_proposals

    def _proposals(self, h: int, w: int, like: Tensor) -> Tensor:
        """``num_proposals`` fixed ``(x1, y1, x2, y2)`` boxes of an image."""
        # Boxes from 1/16 to all of the image: every FPN level gets some.
        frac = torch.linspace(
            1. / 16, 1., self.num_proposals, device=like.device)
        return torch.stack([
            torch.zeros_like(frac),
            torch.zeros_like(frac), frac * w, frac * h
        ], 1).to(like.dtype)

    def forward(self, inputs: Tensor) -> tuple:
        """Run the detector up to its heads, without post-processing.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` normalised images.

        Returns:
            tuple: The dense head's outputs (single-stage), or the RPN
            head's outputs and the RoI head's (two-stage).
        """
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        h, w = inputs.shape[-2:]
        meta = dict(
            img_shape=(h, w),
            ori_shape=(h, w),
            pad_shape=(h, w),
            batch_input_shape=(h, w),
            scale_factor=(1., 1.))
        samples = [DetDataSample(metainfo=meta) for _ in inputs]
        det = self.detector
        feats = det.extract_feat(inputs)
        if not hasattr(det, 'roi_head'):
            return det.bbox_head(feats)
        rpn_outs = det.rpn_head(feats) if det.with_rpn else ()
        proposals = [
            InstanceData(bboxes=self._proposals(h, w, inputs)) for _ in samples
        ]
        return rpn_outs, det.roi_head.forward(feats, proposals, samples)
