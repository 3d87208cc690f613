# Copyright (c) boat-mm contributors. All rights reserved.
"""FLOP handles of BOAT's traced operators, for mmengine's ``FlopAnalyzer``.

:mod:`boat_mm.analysis.complexity` counts with them, and ``import boat_mm``
adds them to mmengine's default handles once ``mmengine.analysis`` is
imported (:func:`register_default_handles`), so that the upstream tools
built on ``mmengine.analysis.get_model_complexity_info`` (the
``get_flops.py`` of mmpretrain and mmdet; mmseg's fails with mmengine
0.10 for any model) count FSLA and SDPA too instead of skipping them as
"unsupported operators".

This module imports nothing of ``mmengine.analysis`` at import time: it
is loaded from inside the import of ``mmengine.analysis`` (the hook), and
importing it first must not start that import (and the hook) half-way.
"""
import math
from collections import Counter
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    'MASKED_ATTENTION_MODES', 'FSLA_NAMESPACES', 'ZERO_COST_PYTHON_OPS',
    'check_masked_attention', 'sdpa_macs', 'clustering_handle',
    'attention_handle', 'zero_handle', 'aten_sdpa_handle', 'flop_handles',
    'register_default_handles'
]

MASKED_ATTENTION_MODES = ('allowed', 'dense')

# The FSLA ops as traced: ``<namespace>::<op>`` of boat_mm.ops._library.
FSLA_NAMESPACES = ('boat_mm', 'boat_mm_triton')

# autograd.Function ops of boat_mm that only move data (gathers).
ZERO_COST_PYTHON_OPS = ('prim::PythonOp._PermuteRows',
                        'prim::PythonOp._GatherQKV')


def check_masked_attention(masked_attention: str) -> None:
    """Refuse a ``masked_attention`` that is not one of
    :data:`MASKED_ATTENTION_MODES`.

    Args:
        masked_attention (str): How masked attention is counted.

    Raises:
        ValueError: It is neither ``'allowed'`` nor ``'dense'``.
    """
    if masked_attention not in MASKED_ATTENTION_MODES:
        raise ValueError(
            f'masked_attention must be one of {MASKED_ATTENTION_MODES}, '
            f'got {masked_attention!r}.')


def sdpa_macs(query_shape: Sequence[int],
              key_shape: Sequence[int],
              value_shape: Sequence[int],
              attn_mask: Optional[Tensor] = None,
              is_causal: bool = False,
              masked_attention: str = 'allowed') -> int:
    """Multiply-adds of ``q @ k^T`` and ``attn @ v`` in one SDPA call.

    Args:
        query_shape (Sequence[int]): ``(..., Lq, E)``.
        key_shape (Sequence[int]): ``(..., Lk, E)``.
        value_shape (Sequence[int]): ``(..., Lk, Ev)``.
        attn_mask (Tensor, optional): The call's mask; a boolean one
            (True = attend) counts only its allowed pairs when
            ``masked_attention='allowed'``. Float masks count dense.
        is_causal (bool): Causal attention; counts the allowed (lower
            triangular) pairs when ``masked_attention='allowed'``.
        masked_attention (str): ``'allowed'`` or ``'dense'``, see
            :mod:`boat_mm.analysis.complexity`.

    Returns:
        int: ``pairs * (E + Ev)``, ``pairs`` the (query, key) pairs
        counted.
    """
    check_masked_attention(masked_attention)
    lq, e = query_shape[-2], query_shape[-1]
    lk, ev = key_shape[-2], value_shape[-1]
    batch = math.prod(query_shape[:-2])
    pairs = batch * lq * lk
    if masked_attention == 'allowed':
        if is_causal:
            # torch's causal mask is tril(ones(Lq, Lk)): row i sees i + 1.
            pairs = batch * sum(min(i + 1, lk) for i in range(lq))
        elif attn_mask is not None and attn_mask.dtype == torch.bool:
            full = torch.broadcast_shapes(attn_mask.shape,
                                          (*query_shape[:-1], lk))
            # Every mask entry stands for numel(full) / numel(mask) pairs.
            repeat = math.prod(full) // max(attn_mask.numel(), 1)
            pairs = int(attn_mask.sum()) * repeat
    return int(pairs * (e + ev))


def _shape(value: Any) -> List[int]:
    """The static shape of a traced tensor input or output."""
    return value.type().sizes()


def _constant(value: Any) -> Any:
    """The Python value of a constant input of a traced node."""
    return value.toIValue()


def clustering_handle(inputs: List[Any], outputs: List[Any]) -> Counter:
    """MACs of ``balanced_clustering(x, num_levels, slot_size, ...)``.

    Per level, the centroid means, two matmuls per k-means iteration and
    the final similarities, each ``2 * slots * d`` MACs per row of ``x``
    (what its tensor ops execute; the kernels do the same arithmetic).

    Args:
        inputs (list): The traced node's inputs.
        outputs (list): The traced node's outputs.

    Returns:
        Counter: ``{'fsla_clustering': MACs}``.
    """
    M, _, d = _shape(inputs[0])
    levels, slot_size, iters = (_constant(x) for x in inputs[1:4])
    slots = slot_size << levels
    macs = 4 * (1 + iters) * M * slots * d * levels
    return Counter({'fsla_clustering': macs} if macs else {})


def _sibling_pairs(num_tokens: int, num_clusters: int, slot_size: int,
                   overlap: int) -> int:
    """(query, key) pairs that FSLA's sibling-pair mask allows, per row.

    Cluster ``c`` holds ``N // G`` real tokens, one more for the first
    ``N % G``. In a pair ``(a, b)`` of real counts, the ``a`` queries see
    their own tokens and ``min(b, overlap)`` of the sibling's, the ``b``
    queries likewise; each padding slot attends to itself.
    """
    base, extra = divmod(num_tokens, num_clusters)
    sizes = [base + (c < extra) for c in range(num_clusters)]
    pairs = 0
    for a, b in zip(sizes[0::2], sizes[1::2]):
        pairs += a * (a + min(b, overlap)) + b * (b + min(a, overlap))
        pairs += 2 * slot_size - a - b
    return pairs


def attention_handle(masked_attention: str = 'allowed') -> Callable:
    """The handle of FSLA's ``clustered_attention`` op.

    It counts ``q @ k^T`` and ``attn @ v`` on the allowed pairs (or on the
    dense ``2S x 2S`` pair blocks).

    Args:
        masked_attention (str): ``'allowed'`` or ``'dense'``.

    Returns:
        Callable: The handle, returning ``{'sdpa': MACs}``.
    """
    check_masked_attention(masked_attention)

    def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
        B, N, C3 = _shape(inputs[0])
        M, slots = _shape(inputs[1])
        heads, slot_size, overlap = (_constant(x) for x in inputs[3:6])
        head_dims = C3 // 3 // heads
        num_clusters = slots // slot_size
        if masked_attention == 'dense':
            pairs = num_clusters // 2 * (2 * slot_size)**2
        else:
            pairs = _sibling_pairs(N, num_clusters, slot_size, overlap)
        return Counter({'sdpa': M * pairs * 2 * head_dims})

    return handle


def zero_handle(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Count nothing: the handle of an op known to do no MACs.

    Args:
        inputs (list): The traced node's inputs.
        outputs (list): The traced node's outputs.

    Returns:
        Counter: Empty.
    """
    return Counter()


def aten_sdpa_handle(inputs: List[Any], outputs: List[Any]) -> Counter:
    """MACs of ``aten::scaled_dot_product_attention``, dense.

    Counted from the shapes: a traced mask is a graph value, not data, so
    its allowed pairs are unknown here (a causal flag is ignored too).

    Args:
        inputs (list): The traced node's inputs.
        outputs (list): The traced node's outputs.

    Returns:
        Counter: ``{'sdpa': MACs}``.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    return Counter({'sdpa': sdpa_macs(q, k, v, masked_attention='dense')})


def flop_handles(masked_attention: str = 'allowed') -> Dict[str, Callable]:
    """The FLOP handles of BOAT's traced operators, by operator name.

    Args:
        masked_attention (str): How FSLA's attention op counts its pairs:
            ``'allowed'`` or ``'dense'``.

    Returns:
        dict: FSLA's clustering and attention ops (both namespaces), SDPA,
        and the data-moving autograd functions (zero).
    """
    handles = {'aten::scaled_dot_product_attention': aten_sdpa_handle}
    for namespace in FSLA_NAMESPACES:
        handles[f'{namespace}::balanced_clustering'] = clustering_handle
        handles[f'{namespace}::clustered_attention'] = attention_handle(
            masked_attention)
    for op in ZERO_COST_PYTHON_OPS:
        handles[op] = zero_handle
    return handles


def register_default_handles(module: ModuleType) -> None:
    """Add BOAT's handles to mmengine's default FLOP and activation ones.

    Only operators that mmengine has no handle for are added.

    ``FlopAnalyzer`` starts from ``_DEFAULT_SUPPORTED_FLOP_OPS`` of
    ``mmengine.analysis.complexity_analysis``, so after this
    ``get_model_complexity_info`` counts FSLA's clustering and attention
    (allowed pairs) and every SDPA call (dense: the operator of any model,
    which mmengine leaves uncounted). A mmengine without these tables is
    left as it is.

    Args:
        module (ModuleType): ``mmengine.analysis.complexity_analysis``.
    """
    # Loaded by now: mmengine.analysis.complexity_analysis imports it.
    from mmengine.analysis.jit_handles import generic_activation_jit
    flop_ops = getattr(module, '_DEFAULT_SUPPORTED_FLOP_OPS', None)
    act_ops = getattr(module, '_DEFAULT_SUPPORTED_ACT_OPS', None)
    if not isinstance(flop_ops, dict) or not isinstance(act_ops, dict):
        return
    flops = flop_handles()
    acts = {'aten::scaled_dot_product_attention': generic_activation_jit()}
    for namespace in FSLA_NAMESPACES:
        # The clustering's outputs are indices, not activations.
        acts[f'{namespace}::balanced_clustering'] = zero_handle
        acts[f'{namespace}::clustered_attention'] = generic_activation_jit()
    for op in ZERO_COST_PYTHON_OPS:
        acts[op] = zero_handle
    for table, handles in ((flop_ops, flops), (act_ops, acts)):
        for name, handle in handles.items():
            table.setdefault(name, handle)
