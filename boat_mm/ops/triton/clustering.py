# Copyright (c) boat-mm contributors. All rights reserved.
"""Triton kernels of ``boat_mm::balanced_clustering``.

:func:`balanced_clustering` has the signature and the contract of the C++
CPU op (``boat_mm/ops/csrc/clustering.cpp``; the op layer registers it as
the Triton implementation) and computes the rule of
:mod:`boat_mm.ops.clustering` (static leaf sizes from ``N``, padding slots
holding token ``N - 1``, excluded from the centroids and placed last in
both children, ties broken by position) on the GPU, or on CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1``, which the tests use). Math
runs in float32 for float32, bfloat16 and float16 inputs (whatever
autocast says) and in float64 for float64 inputs.

Nothing is stored per level but the permutation: every pass loads its
tokens' rows straight from ``x`` through it and normalises them on the
fly, so a split writes 4 bytes per token. A level is a few kernels:

- *One program per node* (nodes of at most :data:`SORT_MAX` slots on a
  level with enough nodes to fill the GPU: the deep levels): one kernel
  computes the initial centroids (or reduces the sums its parent left),
  runs the soft k-means steps, the final similarity ratios, ranks the
  node in the kernel (a bitonic sort, as ``tl.sort``, of ``(ratio bits,
  position)`` packed in an int64 in float32; counting ranks in float64)
  and moves the tokens into the two children, summing the children's
  initial centroids on the way.
- *Chunked* (few, large nodes: the top levels): every node is cut into
  chunks of the same length, one program each. A k-means step is one
  kernel whose programs first reduce the previous step's per-chunk partial
  sums (in a fixed order: deterministic, no atomics) and then write their
  own. Nodes of at most :data:`SORT_MAX` slots are then ranked and split
  by the one-program-per-node kernel; larger ones get one kernel writing
  packed keys (node index above the ratio bits), one ``torch.sort`` of all
  keys of the level (a radix sort; float64: a segmented sort per node)
  and one chunked split kernel.

Grids and buffers depend on the shapes only: no host-device
synchronisation, CUDA-graph capturable. Results equal the tensor
implementation's in float64 (sums run in another order, far below the
gaps between ratios); in float32 they agree up to near-ties.

Tuning (not yet measured on a GPU): a pass is bound by the latency of its
dependent row gathers (``perm``, then ``x``), about a microsecond per
block of tokens, so what counts is how many blocks one program walks in a
row. Chunked passes use blocks of 64 tokens (at 32 dims; about 128
registers per thread at 4 warps) and at least :data:`MIN_CHUNK` slots per
program, aiming at :data:`TARGET_PROGRAMS`; the node kernel walks its node
``kmeans_iters + 2`` times in blocks of up to 128 tokens, which is why
nodes above :data:`SORT_MAX` slots take the chunked passes and one
``torch.sort`` instead. The module constants are the knobs to measure.
"""
from typing import List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ['balanced_clustering', 'level_plans', 'LevelPlan']

# Nodes of at most this many slots are ranked inside a kernel, larger ones
# by one torch.sort of the level's packed keys.
# (The node kernel makes its ratio and split passes over a node in one
# program; see "Tuning" in the module docstring.)
SORT_MAX = 1024
# A chunked pass gives each program at least this many slots of a node.
MIN_CHUNK = 256
# Programs a chunked pass aims at; None: eight per multiprocessor on CUDA,
# four in all for the interpreter.
TARGET_PROGRAMS = None
# Tokens per block of the token loops (at most; fewer for wide vectors).
BLOCK_TOKENS = 128
# Values (tokens x padded dims) per block of the node kernel's loops, at
# most (128 tokens of 32 dims; 256 take 240 registers at 8 warps).
NODE_BLOCK_VALUES = 4096

# Modes of a pass over a node's tokens.
_INIT, _STEP, _KEYS = 0, 1, 2
# Kinds of sort keys: float32 (ratio bits, position) for the in-kernel sort;
# float32 (node, ratio bits) for one stable torch.sort of a level; float64
# ratio bits (counting ranks, or a stable segmented torch.sort).
_KEY_LOCAL, _KEY_GLOBAL, _KEY_F64 = 0, 1, 2

# tl.sum, tl.min and tl.max are jit functions around tl.reduce with these
# combine functions. Calling tl.reduce directly compiles to the same code
# and spares the interpreter a re-patch of triton.language on every call
# (milliseconds each; it would dominate the CPU tests), as does inlining
# small helpers in the token loops below.


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# (Private names of triton.language; the fallbacks compile the same.)
_ADD = getattr(tl.standard, '_sum_combine', _add)
_MIN = getattr(tl.standard, '_elementwise_min', _min)
_MAX = getattr(tl.standard, '_elementwise_max', _max)


@triton.jit
def _node_sizes(t, nodes, leaves, base, extra):
    """Row, first leaf, real tokens ``n`` and those bound for child 0
    ``n0`` of node ``t`` (``nodes`` per row, ``leaves`` leaves each)."""
    first = (t % nodes) * leaves
    n = leaves * base + tl.maximum(
        tl.minimum(extra, first + leaves) - first, 0)
    half = leaves // 2
    n0 = half * base + tl.maximum(tl.minimum(extra, first + half) - first, 0)
    return t // nodes, first, n, n0


@triton.jit
def _real_count(first, count, base, extra):
    """Real tokens of the ``count`` leaves from leaf ``first`` on (the
    first ``extra`` leaves hold ``base + 1``)."""
    bonus = tl.maximum(tl.minimum(extra, first + count) - first, 0)
    return count * base + bonus


@triton.jit
def _normalize(s0, s1, F64: tl.constexpr):
    """``s / max(||s||, 1e-12)`` of both, as
    ``torch.nn.functional.normalize`` (IEEE square root and division in
    float32 too: Triton's defaults are approximate)."""
    if F64:
        n0 = tl.maximum(tl.sqrt(tl.reduce(s0 * s0, 0, _ADD)), 1e-12)
        n1 = tl.maximum(tl.sqrt(tl.reduce(s1 * s1, 0, _ADD)), 1e-12)
        return s0 / n0, s1 / n1
    else:
        n0 = tl.maximum(tl.sqrt_rn(tl.reduce(s0 * s0, 0, _ADD)), 1e-12)
        n1 = tl.maximum(tl.sqrt_rn(tl.reduce(s1 * s1, 0, _ADD)), 1e-12)
        return tl.div_rn(s0, n0), tl.div_rn(s1, n1)


@triton.jit
def _centroids(part_ptr, t, NC, F64: tl.constexpr, DP: tl.constexpr,
               NCB: tl.constexpr):
    """Normalised centroids of node ``t`` from its ``NC`` chunks' partial
    sums ``(NC, 2, DP)``, reduced in a fixed order."""
    c = tl.arange(0, NCB)
    dims = tl.arange(0, DP)
    ptrs = part_ptr + (t * NC + c)[:, None] * (2 * DP) + dims[None, :]
    m = (c < NC)[:, None]
    s0 = tl.reduce(tl.load(ptrs, mask=m, other=0.), 0, _ADD)
    s1 = tl.reduce(tl.load(ptrs + DP, mask=m, other=0.), 0, _ADD)
    return _normalize(s0, s1, F64)


@triton.jit
def _inverse_sizes(n0, n, F64: tl.constexpr, CT: tl.constexpr):
    """``1 / max(size, 1)`` of the two parts of ``n`` real tokens, the
    first ``n0`` and the rest (IEEE division in float32 too)."""
    if F64:
        inv0 = 1. / tl.maximum(n0, 1).to(CT)
        inv1 = 1. / tl.maximum(n - n0, 1).to(CT)
    else:
        inv0 = tl.div_rn(1., tl.maximum(n0, 1).to(CT))
        inv1 = tl.div_rn(1., tl.maximum(n - n0, 1).to(CT))
    return inv0, inv1


@triton.jit
def _node_pass(x_ptr, perm_ptr, key_ptr, t, row_off, d, cap, n, n0, start, end,
               c0, c1, temp, MODE: tl.constexpr, FIRST: tl.constexpr,
               KEY_KIND: tl.constexpr, F64: tl.constexpr, CT: tl.constexpr,
               DP: tl.constexpr, BT: tl.constexpr):
    """One pass over the slots ``[start, end)`` of node ``t`` (its first
    ``n`` real, the first ``n0`` of those bound for child 0).

    ``_INIT``: sums of the initial centroids (means of both parts);
    ``_STEP``: sums of a soft k-means step from centroids ``(c0, c1)``;
    ``_KEYS``: writes the sort keys of the final ratios. Returns the two
    (unnormalised) sums.
    """
    acc0 = tl.zeros([DP], CT)
    acc1 = tl.zeros([DP], CT)
    inv0, inv1 = _inverse_sizes(n0, n, F64, CT)
    # (Inside the token loops the code is written out, also where it
    # repeats _split_range's: the interpreter re-patches triton.language
    # on every call of a jit function: about 15% more interpreter time.)
    dims = tl.arange(0, DP)
    slot0 = t.to(tl.int64) * cap
    for off in range(start, end, BT):
        pos = off + tl.arange(0, BT)
        inside = pos < end
        valid = inside & (pos < n)
        if FIRST:
            tok = pos  # level 0: slot i holds token i
        else:
            tok = tl.load(perm_ptr + slot0 + pos, mask=valid, other=0)
        # The unit vectors and norms of the tokens (zero where invalid).
        v = tl.load(
            x_ptr + row_off + tok.to(tl.int64)[:, None] * d + dims[None, :],
            mask=valid[:, None] & (dims < d)[None, :],
            other=0.).to(CT)
        if F64:
            nrm = tl.maximum(tl.sqrt(tl.reduce(v * v, 1, _ADD)), 1e-12)
            u = v / nrm[:, None]
        else:
            nrm = tl.maximum(tl.sqrt_rn(tl.reduce(v * v, 1, _ADD)), 1e-12)
            u = tl.div_rn(v, nrm[:, None])
        if MODE == 0:
            w0 = tl.where(valid & (pos < n0), nrm * inv0, 0.)
            w1 = tl.where(valid & (pos >= n0), nrm * inv1, 0.)
            acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
            acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
        else:
            s0 = tl.reduce(u * c0[None, :], 1, _ADD)
            s1 = tl.reduce(u * c1[None, :], 1, _ADD)
            if MODE == 1:
                # softmax over two centroids: a sigmoid of the scaled
                # difference; exp of a non-positive argument never
                # overflows.
                logit = (s0 - s1) * temp
                e = tl.exp(-tl.abs(logit))
                if F64:
                    big = 1. / (1. + e)
                else:
                    big = tl.div_rn(1., 1. + e)
                small = e * big
                first = logit >= 0
                w0 = tl.where(valid, tl.where(first, big, small) * nrm, 0.)
                w1 = tl.where(valid, tl.where(first, small, big) * nrm, 0.)
                acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
                acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
            else:
                if F64:
                    r = (s0 + 1.) / (s1 + 1.)
                else:
                    r = tl.div_rn(s0 + 1., s1 + 1.)
                # r >= 0 up to rounding; as the tensor implementation's
                # clamp, so that bit patterns order like values.
                r = tl.where(r < 0, 0., r)
                big_key = tl.full([BT], 9223372036854775807, tl.int64)
                if KEY_KIND == 2:
                    key = r.to(tl.int64, bitcast=True)
                else:
                    bits = r.to(tl.int32, bitcast=True).to(tl.int64)
                    if KEY_KIND == 0:
                        # (ratio bits, position): distinct keys whose
                        # order is the stable order.
                        key = (bits << 32) | pos.to(tl.int64)
                    else:
                        # (node, ratio bits + 2**31): a stable sort of
                        # the level's keys orders every node at once;
                        # padding gets the node's largest key.
                        node = t.to(tl.int64) << 32
                        big_key = node + tl.full([BT], 4294967295, tl.int64)
                        key = node + bits + tl.full([BT], 2147483648, tl.int64)
                key = tl.where(valid, key, big_key)
                tl.store(key_ptr + slot0 + pos, key, mask=inside)
    return acc0, acc1


@triton.jit
def _split_range(x_ptr, perm_in, perm_out, order_ptr, part_out, t, tc, chunk,
                 NCn, row_off, N, d, cap, rank0, count, cn0, p_start, p_end,
                 ORDER_LOCAL: tl.constexpr, FIRST: tl.constexpr,
                 LAST: tl.constexpr, F64: tl.constexpr, CT: tl.constexpr,
                 DP: tl.constexpr, BT: tl.constexpr):
    """Fill slots ``[p_start, p_end)`` of child ``tc`` (node ``t``'s ranks
    ``rank0 + p`` for ``p < count``, then padding) and, unless ``LAST``,
    write the chunk's partial sums of the child's initial centroids (its
    first ``cn0`` real tokens and the rest)."""
    half = cap // 2
    slot0 = t.to(tl.int64) * cap
    acc0 = tl.zeros([DP], CT)
    acc1 = tl.zeros([DP], CT)
    inv0, inv1 = _inverse_sizes(cn0, count, F64, CT)
    dims = tl.arange(0, DP)
    for off in range(p_start, p_end, BT):
        p = off + tl.arange(0, BT)
        inside = p < p_end
        valid = inside & (p < count)
        src = tl.load(order_ptr + slot0 + rank0 + p, mask=valid, other=0)
        if ORDER_LOCAL:
            src = src + slot0
        if FIRST:
            tok = (src - slot0).to(tl.int32)
        else:
            tok = tl.load(perm_in + src, mask=valid, other=0)
        tok = tl.where(valid, tok, N - 1)
        dst = tc.to(tl.int64) * half + p
        if LAST:
            tl.store(perm_out + dst, tok.to(tl.int64), mask=inside)
        else:
            tl.store(perm_out + dst, tok, mask=inside)
            # The unit vectors and norms of the tokens (zero where invalid).
            v = tl.load(
                x_ptr + row_off + tok.to(tl.int64)[:, None] * d +
                dims[None, :],
                mask=valid[:, None] & (dims < d)[None, :],
                other=0.).to(CT)
            if F64:
                nrm = tl.maximum(tl.sqrt(tl.reduce(v * v, 1, _ADD)), 1e-12)
                u = v / nrm[:, None]
            else:
                nrm = tl.maximum(tl.sqrt_rn(tl.reduce(v * v, 1, _ADD)), 1e-12)
                u = tl.div_rn(v, nrm[:, None])
            w0 = tl.where(valid & (p < cn0), nrm * inv0, 0.)
            w1 = tl.where(valid & (p >= cn0), nrm * inv1, 0.)
            acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
            acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
    if not LAST:
        out = part_out + (tc * NCn + chunk) * (2 * DP) + dims
        tl.store(out, acc0)
        tl.store(out + DP, acc1)


@triton.jit
def _sort_keys(x, LOG: tl.constexpr):
    """Ascending sort of the ``2**LOG`` int64 keys ``x``.

    The bitonic network of ``tl.sort`` on the hypercube ``[2] * LOG``, with
    each compare-and-swap along a size-2 axis written as a min and a max
    (``tl.sort`` pairs elements by an xor reduction, which the interpreter
    runs element by element in Python: seconds per sort).
    """
    h = tl.reshape(x, [2] * LOG)
    for stage in tl.static_range(1, LOG + 1):
        # Sub-sequences of 2**stage alternate direction until the last.
        if stage < LOG:
            flip = tl.reshape(
                tl.arange(0, 2), [1] * (LOG - stage - 1) + [2] + [1] * stage)
        else:
            flip = tl.zeros([1] * LOG, tl.int32)
        for k in tl.static_range(stage):
            # Partners differ in bit stage - 1 - k of the position: axis
            # LOG - stage + k of the hypercube.
            right = tl.reshape(
                tl.arange(0, 2),
                [1] * (LOG - stage + k) + [2] + [1] * (stage - 1 - k))
            lo = tl.reduce(h, LOG - stage + k, _MIN, keep_dims=True)
            hi = tl.reduce(h, LOG - stage + k, _MAX, keep_dims=True)
            h = tl.where((flip ^ right) != 0, hi, lo)
    return tl.reshape(h, [2**LOG])


@triton.jit
def _rank_node(key_ptr, order_ptr, t, cap, n, F64: tl.constexpr,
               LOG: tl.constexpr, TILE: tl.constexpr):
    """``order[t * cap + r]``: the slot of node ``t`` whose real token has
    rank ``r`` (ascending key, ties by position), ``r < n``."""
    slot0 = t.to(tl.int64) * cap
    if F64:
        # 63-bit keys leave no room for the position: count, for every
        # token, the tokens before it (smaller key, or equal and earlier).
        ti = tl.arange(0, TILE)
        for i0 in range(0, n, TILE):
            i = i0 + ti
            mi = i < n
            ki = tl.load(key_ptr + slot0 + i, mask=mi, other=0)
            rank = tl.zeros([TILE], tl.int32)
            for j0 in range(0, n, TILE):
                j = j0 + ti
                kj = tl.load(key_ptr + slot0 + j, mask=j < n, other=0)
                before = (kj[None, :] < ki[:, None]) | (
                    (kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
                before = before & (j < n)[None, :]
                rank += tl.reduce(before.to(tl.int32), 1, _ADD)
            tl.store(order_ptr + slot0 + rank, slot0 + i, mask=mi)
    else:
        r = tl.arange(0, 2**LOG)
        key = tl.load(
            key_ptr + slot0 + r, mask=r < n, other=9223372036854775807)
        key = _sort_keys(key, LOG)
        src = key.to(tl.int32)  # the low 32 bits: the position
        tl.store(order_ptr + slot0 + r, slot0 + src, mask=r < n)


@triton.jit
def _pass_kernel(x_ptr, perm_ptr, part_in, part_out, key_ptr, temp_ptr, N, d,
                 cap, nodes, leaves, base, extra, NC, CH, MODE: tl.constexpr,
                 FIRST: tl.constexpr, KEY_KIND: tl.constexpr,
                 F64: tl.constexpr, CT: tl.constexpr, DP: tl.constexpr,
                 BT: tl.constexpr, NCB: tl.constexpr):
    """One chunk of one node: a pass of ``MODE`` over slots
    ``[chunk * CH, (chunk + 1) * CH)``; grid ``(M * nodes * NC,)``."""
    pid = tl.program_id(0)
    t = pid // NC
    chunk = pid % NC
    m, first_leaf, n, n0 = _node_sizes(t, nodes, leaves, base, extra)
    row_off = m.to(tl.int64) * N * d
    temp = tl.load(temp_ptr)
    if MODE == 0:
        c0 = tl.zeros([DP], CT)
        c1 = tl.zeros([DP], CT)
    else:
        c0, c1 = _centroids(part_in, t, NC, F64, DP, NCB)
    start = chunk * CH
    if MODE == 2:
        end = tl.minimum(start + CH, cap)
    else:
        end = tl.minimum(start + CH, n)
    s0, s1 = _node_pass(x_ptr, perm_ptr, key_ptr, t, row_off, d, cap, n, n0,
                        start, end, c0, c1, temp, MODE, FIRST, KEY_KIND, F64,
                        CT, DP, BT)
    if MODE != 2:
        dims = tl.arange(0, DP)
        out = part_out + pid * (2 * DP) + dims
        tl.store(out, s0)
        tl.store(out + DP, s1)


@triton.jit
def _split_kernel(x_ptr, perm_in, perm_out, order_ptr, part_out, N, d, cap,
                  nodes, leaves, base, extra, NCn, CHn,
                  ORDER_LOCAL: tl.constexpr, FIRST: tl.constexpr,
                  LAST: tl.constexpr, F64: tl.constexpr, CT: tl.constexpr,
                  DP: tl.constexpr, BT: tl.constexpr):
    """One chunk of one child after a sort of the level; grid
    ``(M * nodes * 2 * NCn,)``."""
    pid = tl.program_id(0)
    tc = pid // NCn
    chunk = pid % NCn
    t = tc // 2
    child = tc % 2
    m, first_leaf, n, n0 = _node_sizes(t, nodes, leaves, base, extra)
    count = tl.where(child == 0, n0, n - n0)
    cn0 = _real_count(first_leaf + child * (leaves // 2), leaves // 4, base,
                      extra)
    p_start = chunk * CHn
    p_end = tl.minimum(p_start + CHn, cap // 2)
    _split_range(x_ptr, perm_in, perm_out, order_ptr, part_out, t, tc, chunk,
                 NCn,
                 m.to(tl.int64) * N * d, N, d, cap, child * n0, count, cn0,
                 p_start, p_end, ORDER_LOCAL, FIRST, LAST, F64, CT, DP, BT)


@triton.jit
def _node_kernel(x_ptr, perm_in, perm_out, part_in, part_out, key_ptr,
                 order_ptr, temp_ptr, N, d, cap, nodes, leaves, base, extra,
                 iters, NC_in, NCn, CHn, HAS_PARTS: tl.constexpr,
                 FIRST: tl.constexpr, LAST: tl.constexpr, F64: tl.constexpr,
                 CT: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr,
                 NCB: tl.constexpr, LOG: tl.constexpr, TILE: tl.constexpr):
    """A whole level's work on one node (``cap <= 2**LOG``): centroids,
    ``iters`` k-means steps, ratios, ranking and split; grid
    ``(M * nodes,)``."""
    t = tl.program_id(0)
    m, first_leaf, n, n0 = _node_sizes(t, nodes, leaves, base, extra)
    row_off = m.to(tl.int64) * N * d
    temp = tl.load(temp_ptr)
    if HAS_PARTS:
        c0, c1 = _centroids(part_in, t, NC_in, F64, DP, NCB)
    else:
        zero = tl.zeros([DP], CT)
        s0, s1 = _node_pass(x_ptr, perm_in, key_ptr, t, row_off, d, cap, n, n0,
                            0, n, zero, zero, temp, 0, FIRST, 0, F64, CT, DP,
                            BT)
        c0, c1 = _normalize(s0, s1, F64)
    for _ in range(iters):
        s0, s1 = _node_pass(x_ptr, perm_in, key_ptr, t, row_off, d, cap, n, n0,
                            0, n, c0, c1, temp, 1, FIRST, 0, F64, CT, DP, BT)
        c0, c1 = _normalize(s0, s1, F64)
    if F64:
        _node_pass(x_ptr, perm_in, key_ptr, t, row_off, d, cap, n, n0, 0, n,
                   c0, c1, temp, 2, FIRST, 2, F64, CT, DP, BT)
    else:
        _node_pass(x_ptr, perm_in, key_ptr, t, row_off, d, cap, n, n0, 0, n,
                   c0, c1, temp, 2, FIRST, 0, F64, CT, DP, BT)
    # The keys and then the order go through global memory between the
    # block's threads.
    tl.debug_barrier()
    _rank_node(key_ptr, order_ptr, t, cap, n, F64, LOG, TILE)
    tl.debug_barrier()
    half = cap // 2
    for child in range(2):
        count = tl.where(child == 0, n0, n - n0)
        cn0 = _real_count(first_leaf + child * (leaves // 2), leaves // 4,
                          base, extra)
        tc = 2 * t + child
        for chunk in range(NCn):
            p_start = chunk * CHn
            p_end = tl.minimum(p_start + CHn, half)
            _split_range(x_ptr, perm_in, perm_out, order_ptr, part_out, t, tc,
                         chunk, NCn, row_off, N, d, cap, child * n0, count,
                         cn0, p_start, p_end, False, FIRST, LAST, F64, CT, DP,
                         BT)


class LevelPlan(NamedTuple):
    """How a level of the clustering runs (see the module docstring).

    Attributes:
        kind (str): ``'node'``: one program per node does the level;
            ``'chunked'``: chunked k-means passes, then the node kernel
            ranks and splits; ``'global'``: chunked passes, one
            ``torch.sort`` of the level, a chunked split.
        chunks (int): Programs per node of the chunked passes (1 for
            ``'node'``), which also sets how the previous level's split
            writes this level's initial centroid sums.
        chunk_size (int): Slots per chunk, a multiple of the token block.
    """
    kind: str
    chunks: int
    chunk_size: int


def _target_programs(device: torch.device) -> int:
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        return 8 * props.multi_processor_count
    return 4


def _block_tokens(d: int, f64: bool, device: torch.device) -> Tuple[int, int]:
    """(padded dimension, tokens per block) of the token loops.

    On the GPU a block of a chunked pass holds 2048 float32 values (64
    tokens of 32 dims, about 128 registers per thread at 4 warps: four
    programs per multiprocessor); 128 tokens would take 220 registers.
    The interpreter runs larger blocks faster (fewer Python-level ops).
    """
    dp = max(8, triton.next_power_of_2(d))
    values = (2048 if device.type == 'cuda' else 4096) // (2 if f64 else 1)
    return dp, max(16, min(BLOCK_TOKENS, values // dp))


def level_plans(rows: int, num_levels: int, slot_size: int, d: int, f64: bool,
                device: torch.device) -> List[LevelPlan]:
    """The :class:`LevelPlan` of every level for ``rows`` rows of ``d``-dim
    vectors (shapes only, so the same for every call at a resolution)."""
    block = _block_tokens(d, f64, device)[1]
    target = _target_programs(device)
    plans = []
    for level in range(num_levels):
        nodes, cap = rows << level, slot_size << (num_levels - level)
        chunks = max(1, min(-(-target // nodes), cap // max(MIN_CHUNK, 1)))
        size = -(-cap // chunks)
        size = -(-size // block) * block
        chunks = -(-cap // size)
        if cap > SORT_MAX:
            kind = 'global'
        else:
            kind = 'node' if chunks == 1 else 'chunked'
        plans.append(LevelPlan(kind, chunks, size))
    return plans


def _check_args(x: Tensor, num_levels: int, slot_size: int,
                kmeans_iters: int) -> None:
    if x.dim() != 3:
        raise ValueError(f'balanced_clustering expects (M, N, d) vectors, '
                         f'got a {x.dim()}-d tensor.')
    M, N, d = x.shape
    if N < 1 or d < 1:
        raise ValueError(f'balanced_clustering needs N >= 1 tokens of '
                         f'd >= 1 dims, got shape {tuple(x.shape)}.')
    if not 0 <= num_levels < 31:
        raise ValueError(f'num_levels must lie in [0, 31), got {num_levels}.')
    if slot_size < 1 or (slot_size << num_levels) < N:
        raise ValueError(
            f'slot_size * 2**num_levels must hold all {N} tokens, got '
            f'slot_size={slot_size}, num_levels={num_levels}; take both '
            f'from build_cluster_plan(N).')
    if M * (slot_size << num_levels) >= 2**31:
        raise ValueError(
            f'the Triton clustering supports fewer than 2**31 slots in all, '
            f'got {M} rows of {slot_size << num_levels}; split the batch.')
    if kmeans_iters < 0:
        raise ValueError(f'kmeans_iters must be >= 0, got {kmeans_iters}.')
    if x.dtype.is_complex:
        raise ValueError(f'balanced_clustering needs real vectors, got '
                         f'{x.dtype}.')


def balanced_clustering(x: Tensor, num_levels: int, slot_size: int,
                        kmeans_iters: int, temperature: float) -> Tensor:
    """The balanced hierarchical clustering of the rows of ``x``.

    The contract of ``torch.ops.boat_mm.balanced_clustering`` (the C++ CPU
    op); ``num_levels`` and ``slot_size`` come from the
    :class:`~boat_mm.ops.ClusterPlan` of ``N``.

    Args:
        x (Tensor): ``(M, N, d)`` vectors (float64, float32, bfloat16 or
            float16; other real dtypes are converted to float32), on CUDA,
            or on the CPU under ``TRITON_INTERPRET=1``.
        num_levels (int): ``L``: ``2**L`` clusters.
        slot_size (int): ``S``, slots per cluster, ``S * 2**L >= N``.
        kmeans_iters (int): Soft k-means iterations per split.
        temperature (float): Temperature of the soft assignment.

    Returns:
        Tensor: ``perm`` ``(M, S * 2**L)`` int64; ``perm[m, s]`` is the
        token in slot ``s``, cluster ``c`` owns slots ``[c * S, (c + 1) *
        S)`` with its real tokens first; padding slots hold ``N - 1``.
    """
    _check_args(x, num_levels, slot_size, kmeans_iters)
    M, N, d = x.shape
    L, S = num_levels, slot_size
    total, G = S << L, 1 << L
    device = x.device
    if L == 0 or M == 0:
        return torch.arange(
            total, device=device).clamp_(max=N - 1).expand(M,
                                                           total).contiguous()
    f64 = x.dtype == torch.float64
    if x.dtype not in (torch.float64, torch.float32, torch.bfloat16,
                       torch.float16):
        x = x.float()
    x = x.contiguous()
    cdt = torch.float64 if f64 else torch.float32
    DP, BT = _block_tokens(d, f64, device)
    plans = level_plans(M, L, S, d, f64, device)
    NCB = triton.next_power_of_2(max(p.chunks for p in plans))
    part_numel = max((M << lv) * p.chunks for lv, p in enumerate(plans))
    # Partial centroid sums (node, chunk, 2, DP), read by one pass and
    # written by the next: two buffers in turn.
    parts = [
        torch.empty(part_numel * 2 * DP, dtype=cdt, device=device)
        for _ in range(2)
    ]
    # Tokens of every slot between levels (level 0 needs none: slot i
    # holds token i; the last level writes the output).
    perms = [
        torch.empty(
            M * total if L > 1 else 1, dtype=torch.int32, device=device)
        for _ in range(2)
    ]
    out = torch.empty(M, total, dtype=torch.long, device=device)
    keys = torch.empty(M * total, dtype=torch.int64, device=device)
    order = torch.empty(M * total, dtype=torch.int64, device=device)
    # A tensor: a float argument would reach the kernels as float32.
    temp = torch.full((1, ), float(temperature), dtype=cdt, device=device)
    consts = dict(F64=f64, CT=tl.float64 if f64 else tl.float32, DP=DP, BT=BT)
    # Counting ranks (float64) compare TILE x TILE keys at a time; larger
    # tiles only pay in the interpreter.
    tile = 32 if device.type == 'cuda' else 128
    cur = 0  # parts[cur] holds the current level's partial sums
    for lv, plan in enumerate(plans):
        nodes, rows, cap = 1 << lv, M << lv, total >> lv
        first, last = lv == 0, lv + 1 == L
        # The split fills the children in chunks of the next level's (one
        # chunk of the whole leaf after the last level).
        nc_next, ch_next = ((1, -(-S // BT) * BT) if last else
                            (plans[lv + 1].chunks, plans[lv + 1].chunk_size))
        perm_in = perms[lv % 2]
        perm_out = out if last else perms[(lv + 1) % 2]
        shape = (N, d, cap, nodes, G >> lv, N // G, N % G)
        # The node kernel's passes run one after the other in one program:
        # larger blocks (fewer dependent gathers), more warps.
        node_bt = max(
            16,
            min(
                triton.next_power_of_2(cap),
                NODE_BLOCK_VALUES // DP // (2 if f64 else 1)))
        node_kernel_args = dict(
            FIRST=first,
            LAST=last,
            LOG=(cap - 1).bit_length(),
            TILE=tile,
            NCB=NCB,
            num_warps=8 if cap > 512 or node_bt * DP > 2048 else 4,
            **dict(consts, BT=node_bt))
        if plan.kind == 'node':
            _node_kernel[(rows, )](
                x,
                perm_in,
                perm_out,
                parts[cur],
                parts[1 - cur],
                keys,
                order,
                temp,
                *shape,
                kmeans_iters,
                1,
                nc_next,
                ch_next,
                HAS_PARTS=not first,
                **node_kernel_args)
            cur = 1 - cur
            continue
        grid = (rows * plan.chunks, )
        chunking = (plan.chunks, plan.chunk_size)
        if first:
            _pass_kernel[grid](
                x,
                perm_in,
                parts[cur],
                parts[cur],
                keys,
                temp,
                *shape,
                *chunking,
                MODE=_INIT,
                FIRST=True,
                KEY_KIND=0,
                NCB=NCB,
                **consts)
        for _ in range(kmeans_iters):
            _pass_kernel[grid](
                x,
                perm_in,
                parts[cur],
                parts[1 - cur],
                keys,
                temp,
                *shape,
                *chunking,
                MODE=_STEP,
                FIRST=first,
                KEY_KIND=0,
                NCB=NCB,
                **consts)
            cur = 1 - cur
        if plan.kind == 'chunked':
            _node_kernel[(rows, )](
                x,
                perm_in,
                perm_out,
                parts[cur],
                parts[1 - cur],
                keys,
                order,
                temp,
                *shape,
                0,
                plan.chunks,
                nc_next,
                ch_next,
                HAS_PARTS=True,
                **node_kernel_args)
        else:
            _pass_kernel[grid](
                x,
                perm_in,
                parts[cur],
                parts[cur],
                keys,
                temp,
                *shape,
                *chunking,
                MODE=_KEYS,
                FIRST=first,
                KEY_KIND=_KEY_F64 if f64 else _KEY_GLOBAL,
                NCB=NCB,
                **consts)
            if f64:
                # Per node (63-bit keys), stable: a segmented sort.
                level_order = torch.sort(
                    keys.view(rows, cap), dim=-1, stable=True).indices
            else:
                level_order = torch.sort(keys, stable=True).indices
            _split_kernel[(2 * rows * nc_next, )](
                x,
                perm_in,
                perm_out,
                level_order,
                parts[1 - cur],
                *shape,
                nc_next,
                ch_next,
                ORDER_LOCAL=f64,
                FIRST=first,
                LAST=last,
                **consts)
        cur = 1 - cur
    return out
