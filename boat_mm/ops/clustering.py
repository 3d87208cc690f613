# Copyright (c) boat-mm contributors. All rights reserved.
"""Balanced hierarchical clustering of tokens by their features.

This is the grouping step of BOAT's feature-space local attention (FSLA).
Tokens are split recursively into two halves by spherical soft k-means with
two centroids; a split is balanced because tokens are *ranked* by their
relative affinity to the two centroids and cut at a fixed position.

The rule for any number of tokens ``N`` (the published code only handles
``N = group_size * 2**L``):

* ``G = 2**L`` clusters, the leaves of a complete binary tree, with ``L``
  chosen so that ``N / G`` is closest to ``group_size`` (in log scale)
  without exceeding :data:`MAX_MEAN_CLUSTER` ``* group_size`` (see
  :func:`num_clusters_for`). Their real-token counts differ by at most one
  (``N // G`` or ``N // G + 1``); the mean size ``N / G`` lies within
  ``(MIN_MEAN_CLUSTER, MAX_MEAN_CLUSTER] * group_size`` (a cluster may hold
  one token more), unless the whole map is a single cluster
  (``N <= MAX_MEAN_CLUSTER * group_size``), which attends within itself.
* Every leaf has ``S = ceil(N / G)`` slots. Every node knows statically (from
  ``N`` alone) how many real tokens each child receives, so at each level a
  node's tokens are sorted by affinity ratio and the first ``n0`` go to
  child 0, the rest to child 1. Slots not holding a real token (at most one
  per cluster) are *padding*; they are tracked statically, excluded from
  the centroids, sorted last, and never used as keys or outputs by
  :mod:`boat_mm.ops.clustered_attn`.
* For ``N = group_size * 2**L`` there is no padding and every split is into
  exact halves: the result equals the published algorithm (same clusters,
  same order inside clusters).

Three implementations compute this rule, chosen by ``impl`` in
:func:`balanced_hierarchical_clustering` (the choice is made in one place,
:mod:`boat_mm.ops._backends`; the op ``boat_mm::balanced_clustering`` is
defined in :mod:`boat_mm.ops._library`):

* ``'tensor'``: batched tensor ops, for any device. Everything is batched
  over ``M = batch * heads`` rows and over all the nodes of a level; the only
  Python loop runs over the ``L`` levels. No host-device synchronisation
  happens: shapes depend on ``N`` only.
* ``'cpp'``: the C++ CPU kernel of ``torch.ops.boat_mm.balanced_clustering``
  (``boat_mm/ops/csrc/clustering.cpp``, built by
  ``pip install --no-build-isolation -e .``),
  which splits each node in one pass over its tokens per k-means step
  while they are in cache, instead of six memory-bound matmul passes per
  level (faster on the CPU, see docs/benchmarks.md). The same arithmetic,
  with sums in another order: float64 gives identical clusters, float32
  agrees up to near-ties.
* ``'triton'``: the Triton kernels (``boat_mm/ops/triton/clustering.py``)
  for CUDA tensors (or CPU tensors in Triton's interpreter,
  ``TRITON_INTERPRET=1``), one launch per level and no global sort;
  float64 gives the tensor ops' clusters.

The op has a fake kernel, so ``torch.compile`` treats it as one opaque
op. ``'auto'`` (the default) takes Triton for CUDA tensors, the C++
kernel for CPU tensors when it is built, the tensor implementation
otherwise.
"""
import contextlib
import math
import numbers
from collections import OrderedDict
from typing import ContextManager, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backends
from ._backends import CLUSTERING, check_impl, select_backend
from ._library import register_default_kernel

__all__ = [
    'ClusterPlan', 'build_cluster_plan', 'balanced_hierarchical_clustering',
    'cluster_ids_from_perm', 'num_clusters_for', 'cpu_kernel_available',
    'check_impl', 'MAX_MEAN_CLUSTER', 'MIN_MEAN_CLUSTER'
]


def cpu_kernel_available() -> bool:
    """Whether the C++ CPU kernels are built and loaded.

    Returns:
        bool: True if ``boat_mm._C`` (the clustering and the clustered
        attention) is loaded.
    """
    return _backends.cpu_kernel_loaded()


class ClusterPlan(NamedTuple):
    """Static description of the clustering of ``num_tokens`` tokens.

    Everything here depends only on ``(num_tokens, group_size, overlap)`` and
    the device, so it is built once per resolution and cached (the
    :data:`PLAN_CACHE_SIZE` most recently used).

    Attributes:
        num_tokens (int): ``N``.
        num_clusters (int): ``G``, the number of real clusters.
        num_levels (int): ``L = log2 G``.
        slot_size (int): ``S``, capacity of a cluster (max real tokens).
        num_pairs (int): ``P = G / 2`` (1 when ``G == 1``); attention runs
            on sibling pairs.
        uniform (bool): True when ``N == G * S``: no padding anywhere (the
            published algorithm's case).
        level_valid (tuple[Tensor]): per level ``l`` a float ``(2**l, cap_l)``
            mask of real-token positions (real tokens come first in a node).
        level_init (tuple[Tensor]): per level a ``(2**l, 2, cap_l)`` matrix
            whose rows average the first ``n0`` and the remaining real tokens
            of each node (the initial centroids).
        level_split (tuple[Tensor | None]): per level a ``(2**l, cap_l)``
            index that moves sorted positions into the two children's slots
            (None when it is the identity).
        slot_valid (Tensor): bool ``(2 * P * S,)`` (``(S,)`` when
            ``G == 1``), real slots among the slots that attention uses.
        attn_mask (Tensor | None): bool ``(P, 2S, 2S)`` or ``(2S, 2S)`` mask
            of allowed (query, key) pairs inside a sibling pair; None when
            ``G == 1``.
        overlap (int): Keys each cluster borrows from its sibling.
    """
    num_tokens: int
    num_clusters: int
    num_levels: int
    slot_size: int
    num_pairs: int
    uniform: bool
    level_valid: Tuple[Tensor, ...]
    level_init: Tuple[Tensor, ...]
    level_split: Tuple[Optional[Tensor], ...]
    slot_valid: Tensor
    attn_mask: Optional[Tensor]
    overlap: int

    def __repr__(self) -> str:
        # The masks run to megabytes: the numbers that define the plan.
        return (f'ClusterPlan(num_tokens={self.num_tokens}, num_clusters='
                f'{self.num_clusters}, num_levels={self.num_levels}, '
                f'slot_size={self.slot_size}, num_pairs={self.num_pairs}, '
                f'uniform={self.uniform}, overlap={self.overlap}, '
                f'device={self.slot_valid.device})')


#: How many plans :func:`build_cluster_plan` keeps, the least recently
#: used dropped first. A forward needs one per stage with FSLA and input
#: size (for mmseg's 6-scale test-time augmentation, 24 for BOAT-CSWin,
#: FSLA in all four stages, 18 for BOAT-Swin); a plan of ``N`` tokens
#: holds 200 to 340 bytes a token (21 MiB for the 200x336 map of stage 0
#: at 1333x800; 32 plans of detection sizes, about 0.3 GiB), so keeping
#: one for every image size that detection's keep-ratio resizing and
#: multi-scale training produce would grow the GPU memory by gigabytes
#: over a run. What rebuilding costs a multi-scale training step on a GPU
#: is not measured.
PLAN_CACHE_SIZE = 32
_PLAN_CACHE: 'OrderedDict[tuple, ClusterPlan]' = OrderedDict()

#: The any-N rule's largest mean cluster size ``N / G``, in units of
#: ``group_size``: above it the tree goes one level deeper, and a map of
#: at most ``MAX_MEAN_CLUSTER * group_size`` tokens is one cluster.
MAX_MEAN_CLUSTER = 1.35
#: The smallest mean cluster size of a map of several clusters (exclusive),
#: in units of ``group_size``: where the bound above moves a level deeper.
MIN_MEAN_CLUSTER = MAX_MEAN_CLUSTER / 2


def num_clusters_for(num_tokens: int, group_size: int) -> int:
    """Number of clusters ``G = 2**L`` for ``num_tokens`` tokens.

    ``L`` makes ``N / G`` closest to ``group_size`` in log scale, moved one
    level deeper when the mean cluster size ``N / G`` would exceed
    :data:`MAX_MEAN_CLUSTER` ``* group_size``; so ``N / G`` lies within
    ``(MIN_MEAN_CLUSTER, MAX_MEAN_CLUSTER] * group_size`` (clusters hold
    ``N // G`` or ``N // G + 1`` tokens) unless the whole map is one
    cluster (``N <= MAX_MEAN_CLUSTER * group_size``).

    Args:
        num_tokens (int): Number of tokens ``N``.
        group_size (int): Target cluster size.

    Returns:
        int: ``G``, a power of two.
    """
    if group_size < 1:
        raise ValueError(f'group_size must be >= 1, got {group_size}.')
    if num_tokens <= group_size:
        return 1
    level = max(0, round(math.log2(num_tokens / group_size)))
    if num_tokens > MAX_MEAN_CLUSTER * group_size * 2**level:
        level += 1
    return 2**level


def _leaf_sizes(num_tokens: int, num_clusters: int,
                device: torch.device) -> Tensor:
    """Real-token count of each cluster: the first ``N % G`` get one more."""
    t = torch.arange(num_clusters, device=device)
    base, extra = num_tokens // num_clusters, num_tokens % num_clusters
    return base + (t < extra).long()


def _build_plan(num_tokens: int, group_size: int, overlap: int,
                device: torch.device) -> ClusterPlan:
    """Build (uncached) the plan of ``num_tokens`` tokens."""
    return _plan_for_clusters(num_tokens,
                              num_clusters_for(num_tokens, group_size),
                              overlap, device)


def _plan_for_clusters(num_tokens: int, G: int, overlap: int,
                       device: torch.device) -> ClusterPlan:
    """The plan of ``num_tokens`` tokens in ``G`` clusters."""
    # G is a power of two; log2, not int.bit_length, which torch < 2.5's
    # dynamo cannot trace (torch.compile(fullgraph=True) at torch 2.4).
    L = round(math.log2(G))
    S = -(-num_tokens // G)
    P = max(1, G // 2)
    uniform = num_tokens == G * S
    leaves = _leaf_sizes(num_tokens, G, device)

    level_valid, level_init, level_split = [], [], []
    for level in range(L):
        nodes, cap = 2**level, S * 2**(L - level)
        half = cap // 2
        sizes = leaves.view(nodes, 2, -1).sum(-1)  # (nodes, 2) real counts
        n0, n = sizes[:, :1], sizes.sum(-1, keepdim=True)
        pos = torch.arange(cap, device=device).unsqueeze(0)
        level_valid.append((pos < n).float())
        first = (pos < n0).float()
        second = ((pos >= n0) & (pos < n)).float()
        # Means over the two parts; clamp avoids 0/0 for empty parts, whose
        # centroid then normalises to zero and does not move any token.
        init = torch.stack([
            first / n0.clamp(min=1),
            second / (n - n0).clamp(min=1),
        ],
                           dim=1)
        level_init.append(init)
        if uniform:
            level_split.append(None)
        else:
            # Sorted node: real tokens [0, n) then padding [n, cap).
            # Child 0 slots: its n0 real tokens, then padding; child 1 slots:
            # the next n - n0 real tokens, then the remaining padding.
            p = pos % half
            child1 = pos >= half
            n1 = n - n0
            src0 = torch.where(p < n0, p, n + p - n0)
            src1 = torch.where(p < n1, n0 + p, n + half - n0 + p - n1)
            level_split.append(torch.where(child1, src1, src0))
        leaves = leaves.view(-1)

    # Attention uses sibling pairs; a lone cluster uses its own slots.
    num_used = S if G == 1 else G * S
    slot = torch.arange(num_used, device=device)
    leaf_of_slot = slot // S
    pad_sizes = _leaf_sizes(num_tokens, G, device)
    slot_valid = (slot % S) < pad_sizes[leaf_of_slot]
    attn_mask = None
    if G > 1:
        attn_mask = _sibling_mask(pad_sizes.view(P, 2), S, overlap)
        if uniform:
            attn_mask = attn_mask[0]
    return ClusterPlan(num_tokens, G, L, S, P, uniform, tuple(level_valid),
                       tuple(level_init), tuple(level_split), slot_valid,
                       attn_mask, overlap)


def _sibling_mask(pair_sizes: Tensor, slot_size: int, overlap: int) -> Tensor:
    """Allowed (query, key) positions inside each sibling pair.

    A pair holds clusters ``2j`` (slots ``[0, S)``) and ``2j+1`` (slots
    ``[S, 2S)``), each with its real tokens first. Real queries of cluster
    ``2j`` see its real tokens and the first ``overlap`` real tokens of
    ``2j+1``; real queries of ``2j+1`` see its real tokens and the last
    ``overlap`` real tokens of ``2j``. A padding query sees only itself, so
    it neither produces NaNs nor leaks into real tokens' gradients.
    """
    S = slot_size
    idx = torch.arange(2 * S, device=pair_sizes.device)
    in_b, local = idx >= S, idx % S
    s0 = pair_sizes[:, 0].view(-1, 1, 1)
    s1 = pair_sizes[:, 1].view(-1, 1, 1)
    q_b, q_loc = in_b.view(1, -1, 1), local.view(1, -1, 1)
    k_b, k_loc = in_b.view(1, 1, -1), local.view(1, 1, -1)
    ov0, ov1 = s0.clamp(max=overlap), s1.clamp(max=overlap)
    # Queries of cluster 2j (first half).
    allow_a = _pick(k_b, k_loc < ov1, k_loc < s0)
    # Queries of cluster 2j+1 (second half).
    allow_b = _pick(k_b, k_loc < s1, (k_loc >= s0 - ov0) & (k_loc < s0))
    allow = _pick(q_b, allow_b, allow_a)
    q_real = _pick(q_b, q_loc < s1, q_loc < s0)
    diag = (idx.view(-1, 1) == idx.view(1, -1)).unsqueeze(0)
    return _pick(q_real, allow, diag)


def _pick(cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.where(cond, a, b)`` of bool tensors in logic ops, which ONNX
    export can run (onnxruntime has no bool Where)."""
    return (cond & a) | (~cond & b)


def build_cluster_plan(
        num_tokens: int,
        group_size: int = 49,
        overlap: int = 20,
        device: Optional[Union[torch.device, str]] = None) -> ClusterPlan:
    """Return the (cached) static :class:`ClusterPlan` for ``num_tokens``.

    Args:
        num_tokens (int): Number of tokens ``N`` (``H * W``), ``N >= 1``.
        group_size (int): Target cluster size. Defaults to 49.
        overlap (int): Keys borrowed from the sibling cluster. Must be
            smaller than ``group_size``. Defaults to 20.
        device (torch.device | str, optional): Device of the plan's
            tensors.

    Returns:
        ClusterPlan: The static layout.
    """
    if isinstance(num_tokens, float) and not num_tokens.is_integer():
        raise TypeError(f'num_tokens must be an int, got {num_tokens}.')
    # torch.jit tracing (e.g. FLOP counting) passes shapes as 0-d tensors.
    num_tokens = int(num_tokens)
    if num_tokens < 1:
        raise ValueError(f'FSLA needs at least one token, got {num_tokens}.')
    for name, value in (('group_size', group_size), ('overlap', overlap)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f'{name} must be an int, got {value!r}.')
    if not 0 <= overlap < group_size:
        raise ValueError(
            f'overlap must satisfy 0 <= overlap < group_size, got '
            f'overlap={overlap}, group_size={group_size}; lower overlap.')
    device = torch.device('cpu') if device is None else torch.device(device)
    key = (num_tokens, group_size, overlap, device)
    if torch.compiler.is_compiling():
        # Traced as constants; a Python-side cache would be a side effect.
        return _build_plan(num_tokens, group_size, overlap, device)
    # pop and re-insert (each atomic) rather than get and move_to_end, so
    # that a plan another thread evicts in between is no KeyError.
    plan = _PLAN_CACHE.pop(key, None)
    if plan is None:
        with _no_grad():
            plan = _build_plan(num_tokens, group_size, overlap, device)
    _PLAN_CACHE[key] = plan
    while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
        try:
            _PLAN_CACHE.popitem(last=False)
        except KeyError:  # emptied by another thread
            break
    return plan


def _no_grad() -> ContextManager:
    """``torch.no_grad()`` where gradients are on, else no block at all.

    Under ``torch.export`` every grad-mode or autocast block is recorded,
    even one that changes nothing, and torch then splits the graph into
    one sub-module per block and inlines them back: most of the tracing
    time of a BOAT model (``docs/deployment.md``). ONNX export runs
    without gradients.
    """
    return torch.no_grad() if torch.is_grad_enabled() else \
        contextlib.nullcontext()


def _float32(device_type: str) -> ContextManager:
    """Autocast off for ``device_type`` where it is on, else no block.

    ``torch.autocast(device_type, enabled=False)`` only where it changes
    something (see :func:`_no_grad`); none on devices without autocast
    (``meta``), where torch refuses both the block and the question.
    """
    if (_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """Whether ``device_type`` has autocast: a constant to torch.compile,
    as TorchDynamo of torch 2.4 cannot trace the question (a graph break;
    an error under ``fullgraph=True``)."""
    return torch.amp.is_autocast_available(device_type)


def balanced_hierarchical_clustering(x: Tensor,
                                     plan: ClusterPlan,
                                     kmeans_iters: int = 2,
                                     temperature: float = 100.,
                                     impl: str = 'auto') -> Tensor:
    """Cluster the rows of ``x`` into the plan's balanced clusters.

    Args:
        x (Tensor): ``(M, N, d)`` vectors to cluster (BOAT uses the per-head
            queries), one independent clustering per leading row.
        plan (ClusterPlan): From :func:`build_cluster_plan` for ``N``.
        kmeans_iters (int): Soft k-means iterations per split. Defaults to 2.
        temperature (float): Softmax temperature on cosine similarities.
            Defaults to 100.
        impl (str): ``'auto'``, ``'cpp'`` (the C++ CPU kernel),
            ``'triton'`` (the Triton kernels, CUDA) or ``'tensor'`` (tensor
            ops, any device); see the module docstring. Defaults to
            ``'auto'``.

    Returns:
        Tensor: ``perm`` of shape ``(M, 2**L * S)`` (int64): ``perm[m, s]`` is
        the token held by slot ``s``; cluster ``c`` owns slots
        ``[c * S, (c + 1) * S)``, its real tokens first (see
        ``plan.slot_valid``). Padding slots hold token ``N - 1``.
    """
    if x.dim() != 3:
        raise ValueError(f'x must be (M, N, d), got shape {tuple(x.shape)}.')
    if kmeans_iters < 0:  # as the kernels check
        raise ValueError(f'kmeans_iters must be >= 0, got {kmeans_iters}.')
    if x.shape[1] != plan.num_tokens:
        raise ValueError(f'x has {x.shape[1]} tokens but the plan is for '
                         f'{plan.num_tokens}; build the plan for '
                         f'N={x.shape[1]}.')
    with _no_grad():  # the ranking has no gradient
        op = select_backend(CLUSTERING, impl, x).op(CLUSTERING)
        if op is not None:
            # Float32 math under autocast, as in the tensor ops.
            with _float32(x.device.type):
                return op(x, plan.num_levels, plan.slot_size, kmeans_iters,
                          float(temperature))
        return _clustering_tensor_ops(x, plan, kmeans_iters, temperature)


def _default_kernel(x: Tensor, num_levels: int, slot_size: int,
                    kmeans_iters: int, temperature: float) -> Tensor:
    """The tensor ops as ``boat_mm::balanced_clustering``, for inputs that
    no kernel of the op runs (see :func:`boat_mm.ops._backends.
    op_required`); registered below."""
    plan = _plan_for_clusters(x.shape[1], 1 << num_levels, 0, x.device)
    if plan.slot_size != slot_size:
        raise ValueError(
            f'slot_size={slot_size} does not fit {x.shape[1]} tokens in '
            f'{1 << num_levels} clusters (that needs {plan.slot_size}); '
            f'take both from build_cluster_plan.')
    return _clustering_tensor_ops(x, plan, kmeans_iters, temperature)


register_default_kernel(CLUSTERING, _default_kernel)


def _clustering_tensor_ops(x: Tensor, plan: ClusterPlan, kmeans_iters: int,
                           temperature: float) -> Tensor:
    """The ``impl='tensor'`` path of balanced_hierarchical_clustering."""
    M, N, d = x.shape
    L, S = plan.num_levels, plan.slot_size
    total = S * 2**L
    device = x.device
    # Clustering math runs in float32 even under autocast: the ranking is
    # sensitive to rounding and costs little next to attention.
    with _float32(device.type):
        # Normalise once and carry unit vectors plus norms through the
        # levels: cosines need the former, the centroid update (a weighted
        # sum of the raw vectors, as published) needs norm * unit vector.
        # float64 input is clustered in float64 (parity checks), anything
        # else in float32.
        feats = x.double() if x.dtype == torch.float64 else x.float()
        norms = feats.norm(dim=-1).clamp(min=1e-12)
        normed = feats / norms.unsqueeze(-1)
        # Padding slots repeat token N - 1 (not perm[0]: M may be 0).
        pos = torch.arange(total, device=device).clamp(max=N - 1)
        perm = pos.unsqueeze(0).expand(M, total)
        if total > N:
            normed = normed.index_select(1, pos)
            norms = norms.index_select(1, pos)
        for level in range(L):
            nodes, cap = 2**level, total >> level
            rows = M * nodes
            normed = normed.reshape(rows, cap, d)
            norms = norms.reshape(rows, 1, cap)
            valid = plan.level_valid[level]
            init = plan.level_init[level].expand(M, -1, -1, -1)
            cent = F.normalize(
                torch.bmm(init.reshape(rows, 2, cap) * norms, normed), dim=-1)
            for _ in range(kmeans_iters):
                sim = torch.bmm(cent, normed.transpose(1, 2))
                # softmax over two centroids == sigmoid of the difference.
                logit = (sim[:, 0] - sim[:, 1]) * temperature
                assign = torch.stack([logit.sigmoid(), (-logit).sigmoid()],
                                     dim=1) * norms
                if not plan.uniform:
                    assign = assign * valid.repeat(M, 1).unsqueeze(1)
                cent = F.normalize(torch.bmm(assign, normed), dim=-1)
            sim = torch.bmm(cent, normed.transpose(1, 2))
            # r >= 0 up to rounding; clamping makes the float bit patterns
            # order like the values, so an integer sort (faster) ranks them.
            ratio = ((sim[:, 0] + 1) / (sim[:, 1] + 1)).clamp(min=0)
            ratio = ratio.view(M, nodes, cap)
            # flat: (M, nodes, cap) positions in the flattened rows * cap
            # layout, each node's tokens by increasing ratio (ties by
            # position: the published order), padding last.
            flat = _rank_within_nodes(
                ratio, None if plan.uniform else valid.view(nodes, cap) == 0)
            split = plan.level_split[level]
            if split is not None:
                flat = flat.gather(-1, split.expand_as(flat))
            flat = flat.reshape(-1)
            perm = perm.reshape(-1).index_select(0, flat)
            if level + 1 < L:
                # embedding() is the fastest row gather on CPU here.
                normed = F.embedding(flat, normed.reshape(rows * cap, d))
                norms = norms.reshape(rows * cap).index_select(0, flat)
        return perm.reshape(M, total)


# torch sorts a 1-d integer tensor of at least this many elements with a
# parallel radix sort (stable), several times faster on CPU than sorting
# many short rows; see _rank_within_nodes.
_RADIX_MIN_NUMEL = 32768


def _sort_keys(ratio: Tensor, padding: Optional[Tensor]) -> Tensor:
    """The bit patterns of float32 / float64 ``ratio`` without the sign, as
    int32 / int64: non-negative keys that order like the values, with -0
    equal to 0 and a 0/0 NaN (whatever its sign on this device) after
    ``inf``, as torch.sort ranks NaN; padding gets the largest key (ties
    go by position, and padding follows a node's real tokens). The C++
    and Triton keys alike."""
    bits = torch.int64 if ratio.dtype == torch.float64 else torch.int32
    key = ratio.view(bits) & torch.iinfo(bits).max
    if padding is not None:
        key = key.masked_fill(padding, torch.iinfo(bits).max)
    return key


def _rank_within_nodes(ratio: Tensor,
                       padding: Optional[Tensor] = None) -> Tensor:
    """Stable ascending order of ``ratio`` inside each node.

    Args:
        ratio (Tensor): ``(M, nodes, cap)`` non-negative keys (``inf``
            allowed; NaN ranks after ``inf``).
        padding (Tensor, optional): ``(nodes, cap)`` bool, True at the
            padding slots, which rank last (after the real tokens that
            precede them in their node).

    Returns:
        Tensor: ``(M, nodes, cap)`` int64 indices into ``ratio.reshape(-1)``;
        row ``[m, j]`` lists the positions of node ``(m, j)`` sorted by key,
        equal keys in position order.
    """
    M, nodes, cap = ratio.shape
    rows = M * nodes
    numel = ratio.numel()
    on_cpu = ratio.device.type == 'cpu'
    if torch.onnx.is_in_onnx_export():
        # ONNX has no bit cast: rank the float keys themselves, per node,
        # with ONNX TopK (smallest first), which breaks ties by lower
        # index: the order of the stable sorts below (non-negative floats
        # order like their bit patterns).
        # onnxruntime's TopK orders NaN arbitrarily: 0/0 becomes inf,
        # above every finite ratio (inf itself the largest finite float),
        # as the bit keys rank it, and ties with padding, which follows.
        big = torch.finfo(ratio.dtype).max
        ratio = ratio.masked_fill(ratio == float('inf'), big)
        ratio = ratio.masked_fill(ratio.isnan(), float('inf'))
        if padding is not None:
            ratio = ratio.masked_fill(padding, float('inf'))
        order = ratio.topk(cap, dim=-1, largest=False).indices
        base = torch.arange(rows, device=ratio.device).view(M, nodes, 1)
        return order + base * cap
    if ratio.dtype == torch.float32 and (not on_cpu
                                         or 4 * numel >= _RADIX_MIN_NUMEL):
        # Non-negative float32 bit patterns order like the values and fit in
        # 31 bits; the node index goes above them, so one stable sort of
        # the flattened int64 keys orders every node at once (the same
        # result as a stable sort per node).
        node = torch.arange(rows, device=ratio.device, dtype=torch.int64)
        key = _sort_keys(ratio, padding).to(torch.int64).view(rows, cap)
        key = (key | (node << 31).unsqueeze(1)).view(-1)
        if on_cpu and numel < _RADIX_MIN_NUMEL:
            # Padding with the largest key (sorted last) opts mid-sized
            # inputs into the radix sort too; it pays from a quarter of
            # the threshold on (tiny inputs sort faster per node).
            key = torch.cat([
                key,
                key.new_full((_RADIX_MIN_NUMEL - numel, ),
                             torch.iinfo(torch.int64).max)
            ])
        order = key.sort(stable=True).indices[:numel]
        return order.view(M, nodes, cap)
    # Few tokens, or float64 (exact parity checks, 63-bit keys): sort the
    # bit patterns per node.
    order = _sort_keys(ratio, padding).sort(dim=-1, stable=True).indices
    base = torch.arange(rows, device=ratio.device).view(M, nodes, 1)
    return order + base * cap


def cluster_ids_from_perm(perm: Tensor, plan: ClusterPlan) -> Tensor:
    """Cluster index of every token.

    Args:
        perm (Tensor): ``(M, slots)`` from
            :func:`balanced_hierarchical_clustering`.
        plan (ClusterPlan): The plan used to compute ``perm``.

    Returns:
        Tensor: ``(M, N)`` int64 cluster index in ``[0, G)`` per token.
    """
    M = perm.shape[0]
    used = perm[:, :plan.slot_valid.numel()]
    slot = torch.arange(used.shape[1], device=perm.device)
    cluster = (slot // plan.slot_size).expand(M, -1)
    # Padding slots carry -1 so that the real slot of each token wins.
    src = torch.where(plan.slot_valid, cluster, -1)
    ids = torch.full((M, plan.num_tokens),
                     -1,
                     dtype=torch.long,
                     device=perm.device)
    return ids.scatter_reduce(1, used, src, reduce='amax')
