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
fly. The levels run in two schedules (:func:`level_plans`, from the node
size and the number of nodes), one launch per phased level and one for
all the levels below them (plus one zero fill of the counters per call
when a level is phased):

- *Subtree* (the first level whose nodes hold at most :data:`SORT_MAX`
  slots, and every level below it): one program per node of that level
  does its whole subtree, level by level. The node's tokens live in the
  program's own slots of a work buffer (two halves, in and out by
  turns). Per level, each sub-node in turn gets its initial centroids
  (the top node's from the sums its phased parent left), its soft
  k-means steps and its keys: a sub-node of at most
  :data:`RESIDENT_VALUES` values reads its rows of ``x`` once and holds
  them in registers, a larger one re-reads them on every pass. Then one
  bitonic sort in the kernel ranks all the sub-nodes at once (the
  sub-node, the ratio bits and the slot packed in an int64 in float32;
  counting ranks per sub-node in float64), and the tokens move into the
  children's slots (padding ranks last, as in the tensor path).
- *Phased* (nodes of more than :data:`SORT_MAX` slots: the top levels):
  every node is cut into ``C`` chunks of a power-of-two length, and the launch
  runs ``C`` programs per node for each phase of the level: (level 0
  only) the initial centroids' sums, one per k-means step, the keys, the
  ranking and split. A program takes a ticket (an atomic counter) when
  it starts, and its ticket says which phase, node and chunk it does; it
  waits (spinning on a counter, acquire) until the ``C`` programs of the
  previous phase of its node are done, works, and counts itself done
  (release). A program only waits for programs with smaller tickets,
  which have all started, so the launch cannot deadlock however many
  programs are resident (the order of a single-pass scan's look-back;
  the interpreter runs programs one after another in ticket order).
  Partial sums are reduced in a fixed order: deterministic, no atomics
  on data. The keys phase sorts its chunk's 32-bit ratio bits (with the
  position below them) in the kernel; the ranking phase adds, for each of
  its keys, how many keys of every chunk of the node are smaller (binary
  searches in the sorted chunks), which is the key's rank in the node:
  no global sort. float64 (exact parity checks) counts ranks instead.

Grids and buffers depend on the shapes only: no host-device
synchronisation, CUDA-graph capturable. Results equal the tensor
implementation's in float64 (sums run in another order, far below the
gaps between ratios); in float32 they agree up to near-ties.

Compiled variants: the per-``N`` values (slot and node sizes, chunk
counts, iterations) are run-time arguments that Triton does not
specialise on; only powers of two (padded dimension, block and chunk
lengths) and the level's role (first, last, float64) are compile-time.

Tuning (not yet measured on a GPU): a pass is bound by the latency of its
dependent row gathers (``perm``, then ``x``), so what counts is how many
blocks one program walks in a row. Passes use blocks of 64 tokens (at 32
dims; about 128 registers per thread at 4 warps, the subtree kernel's at
16 warps with its sort and register-held sub-nodes); a phased level aims
at :data:`TARGET_PROGRAMS` programs per phase with chunks of at least
:data:`MIN_CHUNK` and at most :data:`CHUNK_MAX` slots. The module
constants are the knobs to measure.
"""
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    'balanced_clustering', 'level_plans', 'LevelPlan', 'TargetInfo',
    'target_info'
]

# The first level whose nodes hold at most this many slots, and every
# level below it, are done by one program per node (subtree schedule);
# at least CHUNK_MAX. A power of two (sorted in the kernel).
SORT_MAX = 1024
# A phased level gives each program at least this many and at most
# CHUNK_MAX slots of a node (powers of two; the chunk is sorted in the
# kernel).
MIN_CHUNK = 128
CHUNK_MAX = 512
# Programs per phase a level aims at; None: eight per multiprocessor on
# CUDA, four in all for the interpreter.
TARGET_PROGRAMS = None
# Tokens per block of the token loops (at most; fewer for wide vectors).
BLOCK_TOKENS = 128
# The device to schedule for whatever the tensors' device (a TargetInfo);
# None: the tensors' device. A model of the GPU sets CUDA's here and runs
# the kernels (or records their launches) in the interpreter.
TARGET = None
# Binary-search probes a ranking step makes at once (chunks x keys); None:
# 2048 on CUDA (no spills at 4 warps, 128 registers), 8192 for the
# interpreter.
SEARCH_VALUES = None
# Values (tokens x padded dims) per block of the subtree kernel's loops;
# None: 2048 on CUDA (64 tokens of 32 dims: 117 registers at 8 warps with
# the level's sort, no spills; 128 tokens spill), 4096 for the
# interpreter.
SUBTREE_BLOCK_VALUES = None
# Values per sub-node the subtree kernel holds in registers for all the
# passes of its level (one read of its rows instead of 2 + iters); larger
# sub-nodes take the block loops. None: 4096 (128 tokens of 32 dims at 16
# warps, 123 registers; 256 tokens spill).
RESIDENT_VALUES = None

# Modes of a pass over a node's tokens (MODE). constexpr globals, which
# jit functions may read: the passes branch on them at compile time.
_INIT = tl.constexpr(0)
_STEP = tl.constexpr(1)
_KEYS = tl.constexpr(2)
# Kinds of sort keys (KEY_KIND): float32 (ratio bits, position) packed in
# an int64; float64 ratio bits (counting ranks).
_KEY_LOCAL = tl.constexpr(0)
_KEY_F64 = tl.constexpr(2)
# Integer arguments that change with N: not specialised (Triton would
# compile again for values of 1 or multiples of 16).
_RUNTIME_INTS = ('N', 'd', 'cap', 'nodes', 'leaves', 'base', 'extra', 'iters',
                 'NS', 'C', 'rows', 'levels')

# tl.sum, tl.min and tl.max are jit functions around tl.reduce with these
# combine functions. Calling tl.reduce directly compiles to the same code
# and spares the interpreter a re-patch of triton.language on every call
# (milliseconds each; it would dominate the CPU tests). The token loops
# below call their helpers once per block, which the tests do not notice.


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
def _centroids(part_ptr, idx0, stride, count, F64: tl.constexpr,
               CT: tl.constexpr, DP: tl.constexpr, SB: tl.constexpr):
    """Normalised centroids from ``count`` partial sums ``(2, DP)``, those
    at indices ``idx0 + s * stride``, reduced ``SB`` at a time in a fixed
    order (loaded past the L1 cache: other programs of the launch may
    have written them)."""
    dims = tl.arange(0, DP)
    s0 = tl.zeros([DP], CT)
    s1 = tl.zeros([DP], CT)
    for b in range(0, count, SB):
        s = b + tl.arange(0, SB)
        ptrs = part_ptr + (idx0 + s.to(tl.int64) * stride)[:, None] * (
            2 * DP) + dims[None, :]
        m = (s < count)[:, None]
        s0 += tl.reduce(
            tl.load(ptrs, mask=m, other=0., cache_modifier='.cg'), 0, _ADD)
        s1 += tl.reduce(
            tl.load(ptrs + DP, mask=m, other=0., cache_modifier='.cg'), 0,
            _ADD)
    return _normalize(s0, s1, F64)


@triton.jit
def _parent_centroids(part_ptr, t, NS, F64: tl.constexpr, CT: tl.constexpr,
                      DP: tl.constexpr, SB: tl.constexpr):
    """Initial centroids of node ``t`` from the sums its parent's split
    wrote: ``(parent, source, child, 2, DP)``, ``NS`` sources."""
    return _centroids(part_ptr, (t // 2).to(tl.int64) * NS * 2 + t % 2, 2, NS,
                      F64, CT, DP, SB)


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
def _unit_rows(x_ptr, row_off, tok, dims, d, valid, F64: tl.constexpr,
               CT: tl.constexpr):
    """The rows ``tok`` of the token matrix as unit vectors, and their
    norms (both zero where not ``valid``), rounded as the tensor path
    rounds them."""
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
    return u, nrm


@triton.jit
def _soft_weights(s0, s1, nrm, valid, temp, F64: tl.constexpr):
    """Weights of the rows in a soft k-means step: the softmax over the
    two centroids of the scaled similarities ``(s0, s1)``, times the rows'
    norms (zero where not ``valid``)."""
    # A sigmoid of the scaled difference; exp of a non-positive argument
    # never overflows.
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
    return w0, w1


@triton.jit
def _ratio(s0, s1, F64: tl.constexpr):
    """The sort ratio ``(s0 + 1) / (s1 + 1)``, clamped at 0."""
    if F64:
        r = (s0 + 1.) / (s1 + 1.)
    else:
        r = tl.div_rn(s0 + 1., s1 + 1.)
    # r >= 0 up to rounding; as the tensor implementation's clamp, so
    # that bit patterns order like values. The keys drop the sign bit, so
    # that -0 ties with 0 and a 0/0 NaN ranks last (after inf) whatever
    # sign the device gives it, as torch.sort ranks NaN.
    return tl.where(r < 0, 0., r)


@triton.jit
def _subtree_key(r, valid, j, p, F64: tl.constexpr, LOG: tl.constexpr):
    """The subtree kernel's sort key of slot ``p`` of sub-node ``j``:
    float64 the ratio bits (counting ranks); float32 ``(j, ratio bits,
    slot)`` packed in an int64, one sort ranking all the level's
    sub-nodes."""
    if F64:
        key = r.to(tl.int64, bitcast=True) & 9223372036854775807
    else:
        # The ratio bits without the sign (see _ratio) made unsigned, as
        # the phased keys order them; padding above every real token, by
        # slot.
        bits = r.to(tl.int32, bitcast=True).to(tl.int64) & 2147483647
        bits = tl.where(valid, bits + 2147483648, 4294967295)
        node = tl.zeros_like(bits) + j
        key = (node << (32 + LOG)) | (bits << LOG) | p.to(tl.int64)
    return key


@triton.jit
def _node_pass(x_ptr, perm_ptr, key_ptr, key_base, t, row_off, d, cap, n, n0,
               start, end, c0, c1, temp, MODE: tl.constexpr,
               FIRST: tl.constexpr, KEY_KIND: tl.constexpr, F64: tl.constexpr,
               CT: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """One pass over the slots ``[start, end)`` of node ``t`` (its first
    ``n`` real, the first ``n0`` of those bound for child 0).

    ``_INIT``: sums of the initial centroids (means of both parts);
    ``_STEP``: sums of a soft k-means step from centroids ``(c0, c1)``;
    ``_KEYS``: writes the sort key of slot ``p`` at ``key_base + p``, of
    the kind ``KEY_KIND`` (``_KEY_LOCAL`` or ``_KEY_F64``).
    Returns the two (unnormalised) sums.
    """
    acc0 = tl.zeros([DP], CT)
    acc1 = tl.zeros([DP], CT)
    inv0, inv1 = _inverse_sizes(n0, n, F64, CT)
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
        u, nrm = _unit_rows(x_ptr, row_off, tok, dims, d, valid, F64, CT)
        if MODE == _INIT:
            w0 = tl.where(valid & (pos < n0), nrm * inv0, 0.)
            w1 = tl.where(valid & (pos >= n0), nrm * inv1, 0.)
            acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
            acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
        else:
            s0 = tl.reduce(u * c0[None, :], 1, _ADD)
            s1 = tl.reduce(u * c1[None, :], 1, _ADD)
            if MODE == _STEP:
                w0, w1 = _soft_weights(s0, s1, nrm, valid, temp, F64)
                acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
                acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
            else:
                r = _ratio(s0, s1, F64)
                if KEY_KIND == _KEY_F64:
                    key = r.to(tl.int64, bitcast=True) & 9223372036854775807
                else:
                    # (ratio bits, position): distinct keys whose order is
                    # the stable order; padding above every real token
                    # (NaN ratios included), in position order.
                    bits = r.to(
                        tl.int32, bitcast=True).to(tl.int64) & 2147483647
                    bits = tl.where(valid, bits, 2147483647)
                    key = (bits << 32) | pos.to(tl.int64)
                tl.store(key_ptr + key_base + pos, key, mask=inside)
    return acc0, acc1


@triton.jit
def _scatter_block(x_ptr, perm_in, perm_out, t, row_off, N, d, cap, n, n0, q00,
                   q10, pos, R, ok, a00, a01, a10, a11, i00, i01, i10, i11,
                   FIRST: tl.constexpr, LAST: tl.constexpr, F64: tl.constexpr,
                   CT: tl.constexpr, DP: tl.constexpr):
    """Moves the slots ``pos`` of node ``t`` (where ``ok``), whose ranks in
    the node are ``R``, into the children's slots (child 0: ranks
    ``[0, n0)``, then padding; child 1: ranks ``[n0, n)``, then the rest
    of the padding) and adds their terms to the sums ``a<child><part>``
    of the children's initial centroids (part 0: the first ``q<child>0``
    real tokens of the child; weights ``i<child><part>``)."""
    half = cap // 2
    slot0 = t.to(tl.int64) * cap
    real = ok & (R < n)
    if FIRST:
        tok = pos
    else:
        tok = tl.load(perm_in + slot0 + pos, mask=real, other=0)
    tok = tl.where(real, tok, N - 1)
    # Padding rank n + k goes to child 0 while it has room, then child 1.
    k = R - n
    dst = tl.where(R < n, tl.where(R < n0, R, half + R - n0),
                   tl.where(k < half - n0, n0 + k, R))
    if LAST:
        tl.store(perm_out + slot0 + dst, tok.to(tl.int64), mask=ok)
    else:
        tl.store(perm_out + slot0 + dst, tok, mask=ok)
        dims = tl.arange(0, DP)
        u, nrm = _unit_rows(x_ptr, row_off, tok, dims, d, real, F64, CT)
        w = tl.where(real & (R < q00), nrm * i00, 0.)
        a00 += tl.reduce(w[:, None] * u, 0, _ADD)
        w = tl.where(real & (R >= q00) & (R < n0), nrm * i01, 0.)
        a01 += tl.reduce(w[:, None] * u, 0, _ADD)
        w = tl.where(real & (R >= n0) & (R < n0 + q10), nrm * i10, 0.)
        a10 += tl.reduce(w[:, None] * u, 0, _ADD)
        w = tl.where(real & (R >= n0 + q10), nrm * i11, 0.)
        a11 += tl.reduce(w[:, None] * u, 0, _ADD)
    return a00, a01, a10, a11


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


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _level_kernel(x_ptr, perm_in, perm_out, part_in, part_out, step_ptr,
                  key_ptr, sync_ptr, temp_in, N, d, cap, nodes, leaves, base,
                  extra, iters, NS, C, rows, FIRST: tl.constexpr,
                  LAST: tl.constexpr, F64: tl.constexpr, CT: tl.constexpr,
                  DP: tl.constexpr, BT: tl.constexpr, SB: tl.constexpr,
                  CH: tl.constexpr, LOG: tl.constexpr, RB: tl.constexpr,
                  CB: tl.constexpr, TILE: tl.constexpr):
    """A phased level (see the module docstring): ``C`` chunks of ``CH``
    slots per node, ``rows`` nodes, programs ordered by phase;
    grid ``(rows * C * phases,)``, ``sync`` zeroed (ticket, then one
    counter per phase and node)."""
    # The ticket, not the program id, says what to do: every ticket below
    # this one belongs to a program that has started.
    tk = tl.atomic_add(sync_ptr, 1)
    per_phase = rows * C
    phase = tk // per_phase
    t = (tk % per_phase) // C
    c = tk % C
    m, first_leaf, n, n0 = _node_sizes(t, nodes, leaves, base, extra)
    row_off = m.to(tl.int64) * N * d
    if F64:
        temp = tl.load(temp_in)
    else:
        temp = temp_in
    done = sync_ptr + 1 + t
    if phase > 0:
        while tl.atomic_add(done + (phase - 1) * rows, 0, sem='acquire') < C:
            pass
    if FIRST:
        p = phase - 1  # phase 0 sums the initial centroids
    else:
        p = phase
    start = c * CH
    dims = tl.arange(0, DP)
    node_keys = t.to(tl.int64) * C * CH
    # Partial sums of k-means steps: (2 buffers, node, chunk, 2, DP).
    step_out = step_ptr + (
        (phase % 2) * per_phase + t * C + c).to(tl.int64) * (2 * DP) + dims
    step_in = (1 - phase % 2) * per_phase + t * C
    zero = tl.zeros([DP], CT)
    if p < 0:
        s0, s1 = _node_pass(x_ptr, perm_in, key_ptr, node_keys, t,
                            row_off, d, cap, n, n0, start,
                            tl.minimum(start + CH, n), zero, zero, temp, _INIT,
                            FIRST, _KEY_LOCAL, F64, CT, DP, BT)
        tl.store(step_out, s0)
        tl.store(step_out + DP, s1)
    elif p <= iters:
        if FIRST:
            c0, c1 = _centroids(step_ptr, step_in, 1, C, F64, CT, DP, SB)
        elif p == 0:
            c0, c1 = _parent_centroids(part_in, t, NS, F64, CT, DP, SB)
        else:
            c0, c1 = _centroids(step_ptr, step_in, 1, C, F64, CT, DP, SB)
        if p < iters:
            s0, s1 = _node_pass(x_ptr, perm_in, key_ptr, node_keys, t,
                                row_off, d, cap, n, n0, start,
                                tl.minimum(start + CH, n), c0, c1, temp, _STEP,
                                FIRST, _KEY_LOCAL, F64, CT, DP, BT)
            tl.store(step_out, s0)
            tl.store(step_out + DP, s1)
        elif F64:
            _node_pass(x_ptr, perm_in, key_ptr, node_keys, t,
                       row_off, d, cap, n, n0, start,
                       tl.minimum(start + CH, cap), c0, c1, temp, _KEYS, FIRST,
                       _KEY_F64, F64, CT, DP, BT)
        else:
            _node_pass(x_ptr, perm_in, key_ptr, node_keys, t,
                       row_off, d, cap, n, n0, start,
                       tl.minimum(start + CH, cap), c0, c1, temp, _KEYS, FIRST,
                       _KEY_LOCAL, F64, CT, DP, BT)
            # Sort the chunk's keys (slots past the node's end last).
            tl.debug_barrier()
            i = tl.arange(0, CH)
            kp = key_ptr + node_keys + start + i
            keys = tl.load(kp, mask=start + i < cap, other=9223372036854775807)
            tl.debug_barrier()
            tl.store(kp, _sort_keys(keys, LOG))
    else:
        # Rank and split: each slot of the chunk goes to its rank's place.
        q00 = _real_count(first_leaf, leaves // 4, base, extra)
        q10 = _real_count(first_leaf + leaves // 2, leaves // 4, base, extra)
        i00, i01 = _inverse_sizes(q00, n0, F64, CT)
        i10, i11 = _inverse_sizes(q10, n - n0, F64, CT)
        a00 = tl.zeros([DP], CT)
        a01 = tl.zeros([DP], CT)
        a10 = tl.zeros([DP], CT)
        a11 = tl.zeros([DP], CT)
        length = tl.minimum(CH, cap - start)
        for off in range(0, CH, RB):
            e = off + tl.arange(0, RB)
            ok = e < length
            if F64:
                # 63-bit keys leave no room for the position: count the
                # real tokens before each (smaller key, or equal and
                # earlier); padding ranks by position.
                pos = start + e
                ki = tl.load(
                    key_ptr + node_keys + pos,
                    mask=ok & (pos < n),
                    other=0,
                    cache_modifier='.cg')
                rank = tl.zeros([RB], tl.int32)
                tj = tl.arange(0, TILE)
                for j0 in range(0, n, TILE):
                    j = j0 + tj
                    kj = tl.load(
                        key_ptr + node_keys + j,
                        mask=j < n,
                        other=0,
                        cache_modifier='.cg')
                    before = (kj[None, :]
                              < ki[:, None]) | ((kj[None, :] == ki[:, None]) &
                                                (j[None, :] < pos[:, None]))
                    before = before & (j < n)[None, :]
                    rank += tl.reduce(before.to(tl.int32), 1, _ADD)
                R = tl.where(pos < n, rank, pos)
            else:
                # The keys are distinct: a key's rank in the node is the
                # number of smaller keys in all sorted chunks (its own
                # included), found by binary searches.
                key = tl.load(
                    key_ptr + node_keys + start + e, cache_modifier='.cg')
                R = tl.zeros([RB], tl.int32)
                cc = tl.arange(0, CB)
                for c0 in range(0, C, CB):
                    chunk = c0 + cc
                    cm = (chunk < C)[:, None]
                    cbase = key_ptr + node_keys + chunk.to(tl.int64)[:,
                                                                     None] * CH
                    below = tl.zeros([CB, RB], tl.int32)
                    for s in tl.static_range(LOG):
                        probe = tl.load(
                            cbase + below + ((CH >> (s + 1)) - 1),
                            mask=cm,
                            other=9223372036854775807,
                            cache_modifier='.cg')
                        below += tl.where(probe < key[None, :], CH >> (s + 1),
                                          0)
                    probe = tl.load(
                        cbase + below,
                        mask=cm,
                        other=9223372036854775807,
                        cache_modifier='.cg')
                    below += (probe < key[None, :]).to(tl.int32)
                    R += tl.reduce(below, 0, _ADD)
                pos = (key & 4294967295).to(tl.int32)
            a00, a01, a10, a11 = _scatter_block(x_ptr, perm_in, perm_out, t,
                                                row_off, N, d, cap, n, n0, q00,
                                                q10, pos, R, ok, a00, a01, a10,
                                                a11, i00, i01, i10, i11, FIRST,
                                                LAST, F64, CT, DP)
        if not LAST:
            # (parent, source chunk, child, part, DP)
            out = part_out + (t * C + c).to(tl.int64) * (4 * DP) + dims
            tl.store(out, a00)
            tl.store(out + DP, a01)
            tl.store(out + 2 * DP, a10)
            tl.store(out + 3 * DP, a11)
    # Count this program done once all its threads' writes are.
    tl.debug_barrier()
    tl.atomic_add(done + phase * rows, 1, sem='release')


@triton.jit
def _subtree_pass(x_ptr, work_ptr, cur, key_ptr, kbase, row_off, d, j, start,
                  end, n, n0, c0, c1, temp, MODE: tl.constexpr,
                  F64: tl.constexpr, CT: tl.constexpr, DP: tl.constexpr,
                  BT: tl.constexpr, LOG: tl.constexpr):
    """One pass of the subtree kernel over the slots ``[start, start +
    end)`` of its program's region: sub-node ``j`` of the current level,
    its first ``n`` slots real, the first ``n0`` of those bound for child
    0; the tokens at ``work[cur + slot]``.

    ``_INIT`` / ``_STEP``: as :func:`_node_pass`; ``_KEYS``: writes the
    sort key of every slot at ``key_ptr + kbase + slot``: float32
    ``(j, ratio bits, slot)`` packed in an int64 (one sort ranks all the
    sub-nodes of the level), float64 the ratio bits (counting ranks).
    """
    acc0 = tl.zeros([DP], CT)
    acc1 = tl.zeros([DP], CT)
    inv0, inv1 = _inverse_sizes(n0, n, F64, CT)
    dims = tl.arange(0, DP)
    for off in range(0, end, BT):
        q = off + tl.arange(0, BT)
        inside = q < end
        valid = inside & (q < n)
        p = start + q
        tok = tl.load(work_ptr + cur + p, mask=valid, other=0)
        u, nrm = _unit_rows(x_ptr, row_off, tok, dims, d, valid, F64, CT)
        if MODE == _INIT:
            w0 = tl.where(valid & (q < n0), nrm * inv0, 0.)
            w1 = tl.where(valid & (q >= n0), nrm * inv1, 0.)
            acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
            acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
        else:
            s0 = tl.reduce(u * c0[None, :], 1, _ADD)
            s1 = tl.reduce(u * c1[None, :], 1, _ADD)
            if MODE == _STEP:
                w0, w1 = _soft_weights(s0, s1, nrm, valid, temp, F64)
                acc0 += tl.reduce(w0[:, None] * u, 0, _ADD)
                acc1 += tl.reduce(w1[:, None] * u, 0, _ADD)
            else:
                key = _subtree_key(_ratio(s0, s1, F64), valid, j, p, F64, LOG)
                tl.store(key_ptr + kbase + p, key, mask=inside)
    return acc0, acc1


@triton.jit
def _resident_node(x_ptr, work_ptr, cur, key_ptr, kbase, row_off, d, j, start,
                   ck, n, n0, p0, p1, use, iters, temp, F64: tl.constexpr,
                   CT: tl.constexpr, DP: tl.constexpr, RT: tl.constexpr,
                   LOG: tl.constexpr):
    """Sub-node ``j`` of ``ck <= RT`` slots of the subtree kernel, its rows
    loaded once and held in registers: its centroids (the parent's sums
    ``(p0, p1)`` where ``use``), ``iters`` k-means steps and keys, as the
    passes of :func:`_subtree_pass` compute them."""
    q = tl.arange(0, RT)
    inside = q < ck
    valid = q < n
    p = start + q
    tok = tl.load(work_ptr + cur + p, mask=valid, other=0)
    dims = tl.arange(0, DP)
    u, nrm = _unit_rows(x_ptr, row_off, tok, dims, d, valid, F64, CT)
    inv0, inv1 = _inverse_sizes(n0, n, F64, CT)
    w0 = tl.where(valid & (q < n0), nrm * inv0, 0.)
    w1 = tl.where(valid & (q >= n0), nrm * inv1, 0.)
    c0, c1 = _normalize(
        tl.reduce(w0[:, None] * u, 0, _ADD), tl.reduce(w1[:, None] * u, 0,
                                                       _ADD), F64)
    c0 = tl.where(use, p0, c0)
    c1 = tl.where(use, p1, c1)
    for _ in range(iters):
        s0 = tl.reduce(u * c0[None, :], 1, _ADD)
        s1 = tl.reduce(u * c1[None, :], 1, _ADD)
        w0, w1 = _soft_weights(s0, s1, nrm, valid, temp, F64)
        c0, c1 = _normalize(
            tl.reduce(w0[:, None] * u, 0, _ADD),
            tl.reduce(w1[:, None] * u, 0, _ADD), F64)
    s0 = tl.reduce(u * c0[None, :], 1, _ADD)
    s1 = tl.reduce(u * c1[None, :], 1, _ADD)
    key = _subtree_key(_ratio(s0, s1, F64), valid, j, p, F64, LOG)
    tl.store(key_ptr + kbase + p, key, mask=inside)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _subtree_kernel(x_ptr, perm_in, out_ptr, part_in, work_ptr, key_ptr,
                    order_ptr, temp_in, N, d, cap, nodes, leaves, base, extra,
                    iters, NS, levels, HAS_PARTS: tl.constexpr,
                    FIRST: tl.constexpr, F64: tl.constexpr, CT: tl.constexpr,
                    DP: tl.constexpr, BT: tl.constexpr, RT: tl.constexpr,
                    SB: tl.constexpr, LOG: tl.constexpr, TILE: tl.constexpr):
    """A node of ``cap <= 2**LOG`` slots and its whole subtree: ``levels``
    levels, the last one the clustering's; grid ``(M * nodes,)``.

    The tokens of the node's slots live in the program's region of
    ``work`` (two halves of ``cap`` slots, in and out by turns); every pass
    of a level re-reads its sub-nodes' rows of ``x`` through them. Per
    level: every sub-node's centroids, k-means steps and keys, one in-kernel
    sort of the level's keys (sub-node in the high bits; float64 counts
    ranks per sub-node instead), then the move into the children.
    """
    t = tl.program_id(0)
    m = t // nodes
    row_off = m.to(tl.int64) * N * d
    if F64:
        temp = tl.load(temp_in)
    else:
        temp = temp_in
    slot0 = t.to(tl.int64) * cap
    wbase = 2 * slot0
    zero = tl.zeros([DP], CT)
    # The node's tokens into the first half of the region (level 0: slot
    # i holds token i, padding token N - 1).
    for off in range(0, cap, BT):
        p = off + tl.arange(0, BT)
        inside = p < cap
        if FIRST:
            tok = tl.minimum(p, N - 1)
        else:
            tok = tl.load(perm_in + slot0 + p, mask=inside, other=0)
        tl.store(work_ptr + wbase + p, tok, mask=inside)
    tl.debug_barrier()
    r_all = tl.arange(0, 2**LOG)
    for k in range(levels):
        ck = cap >> k
        cur = wbase + (k % 2) * cap
        nxt = wbase + (1 - k % 2) * cap
        for j in range(1 << k):
            _, _, n, n0 = _node_sizes((t << k) + j, nodes << k, leaves >> k,
                                      base, extra)
            start = j * ck
            # The top node's initial centroids are the sums its parent's
            # split left (phased levels above), the others' their means.
            if HAS_PARTS:
                use = k == 0
                p0, p1 = _centroids(part_in,
                                    (t // 2).to(tl.int64) * NS * 2 + t % 2, 2,
                                    tl.where(use, NS, 0), F64, CT, DP, SB)
            else:
                use = k < 0
                p0 = zero
                p1 = zero
            if ck <= RT:
                _resident_node(x_ptr, work_ptr, cur, key_ptr, slot0, row_off,
                               d, j, start, ck, n, n0, p0, p1, use, iters,
                               temp, F64, CT, DP, RT, LOG)
            else:
                s0, s1 = _subtree_pass(x_ptr, work_ptr, cur, key_ptr,
                                       slot0, row_off, d, j, start,
                                       tl.where(use, 0, n), n, n0, zero, zero,
                                       temp, _INIT, F64, CT, DP, BT, LOG)
                c0, c1 = _normalize(s0, s1, F64)
                c0 = tl.where(use, p0, c0)
                c1 = tl.where(use, p1, c1)
                for _ in range(iters):
                    s0, s1 = _subtree_pass(x_ptr, work_ptr, cur, key_ptr,
                                           slot0, row_off, d, j, start, n, n,
                                           n0, c0, c1, temp, _STEP, F64, CT,
                                           DP, BT, LOG)
                    c0, c1 = _normalize(s0, s1, F64)
                _subtree_pass(x_ptr, work_ptr, cur, key_ptr, slot0, row_off, d,
                              j, start, ck, n, n0, c0, c1, temp, _KEYS, F64,
                              CT, DP, BT, LOG)
        # Keys, then the order, go through global memory between the
        # block's threads.
        tl.debug_barrier()
        if F64:
            # 63-bit keys leave no room for the slot: count, for every real
            # token, those of its sub-node before it (smaller key, or equal
            # and earlier); padding keeps its place.
            ti = tl.arange(0, TILE)
            for j in range(1 << k):
                _, _, n, _ = _node_sizes((t << k) + j, nodes << k, leaves >> k,
                                         base, extra)
                start = j * ck
                for i0 in range(0, ck, TILE):
                    i = i0 + ti
                    mi = i < n
                    ki = tl.load(key_ptr + slot0 + start + i, mask=mi, other=0)
                    rank = tl.where(mi, 0, i)
                    for j0 in range(0, n, TILE):
                        jj = j0 + ti
                        kj = tl.load(
                            key_ptr + slot0 + start + jj, mask=jj < n, other=0)
                        before = (kj[None, :] < ki[:, None]) | (
                            (kj[None, :] == ki[:, None]) &
                            (jj[None, :] < i[:, None]))
                        before = before & (jj < n)[None, :] & mi[:, None]
                        rank += tl.reduce(before.to(tl.int32), 1, _ADD)
                    tl.store(
                        order_ptr + slot0 + start + rank,
                        start + i,
                        mask=i < ck)
        else:
            key = tl.load(
                key_ptr + slot0 + r_all,
                mask=r_all < cap,
                other=9223372036854775807)
            key = _sort_keys(key, LOG)
            tl.store(
                order_ptr + slot0 + r_all, (key & (2**LOG - 1)).to(tl.int32),
                mask=r_all < cap)
        tl.debug_barrier()
        # Rank r of the level's order: sub-node r // ck, rank R in it.
        last = k + 1 == levels
        for roff in range(0, cap, BT):
            r = roff + tl.arange(0, BT)
            ok = r < cap
            sub = r // ck
            R = r - sub * ck
            _, _, nr, n0r = _node_sizes((t << k) + sub, nodes << k,
                                        leaves >> k, base, extra)
            real = R < nr
            slot = tl.load(order_ptr + slot0 + r, mask=ok, other=0)
            moved = tl.load(work_ptr + cur + slot, mask=ok & real, other=0)
            moved = tl.where(real, moved, N - 1)
            # Padding rank n + k goes to child 0 while it has room, then
            # child 1 (as _scatter_block).
            half = ck // 2
            pad = R - nr
            dst = sub * ck + tl.where(real, tl.where(R < n0r, R,
                                                     half + R - n0r),
                                      tl.where(pad < half - n0r, n0r + pad, R))
            if last:
                tl.store(out_ptr + slot0 + dst, moved.to(tl.int64), mask=ok)
            else:
                tl.store(work_ptr + nxt + dst, moved, mask=ok)
        tl.debug_barrier()


class TargetInfo(NamedTuple):
    """What the schedule needs to know of the device.

    Attributes:
        cuda (bool): Compiled kernels on a CUDA device; False: Triton's
            interpreter (other block sizes, fewer programs).
        sm_count (int): Multiprocessors of the device.
    """
    cuda: bool
    sm_count: int


_TARGETS = {}


def target_info(device: Union[torch.device, str]) -> TargetInfo:
    """The :class:`TargetInfo` of a device.

    Cached per device: no ``get_device_properties`` per call.

    Args:
        device (torch.device | str): The device of the inputs.

    Returns:
        TargetInfo: What the schedule needs to know of it.
    """
    device = torch.device(device)
    if device.type != 'cuda':
        return TargetInfo(False, 1)
    index = (
        device.index
        if device.index is not None else torch.cuda.current_device())
    info = _TARGETS.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        info = _TARGETS[index] = TargetInfo(True, props.multi_processor_count)
    return info


def _target_for(device: torch.device) -> TargetInfo:
    """What a call on ``device`` is scheduled for: :data:`TARGET` if set,
    else ``device``."""
    return TARGET if TARGET is not None else target_info(device)


def _as_target(target: Union[TargetInfo, torch.device, str]) -> TargetInfo:
    """``target``, or the :class:`TargetInfo` of the device it names."""
    return target if isinstance(target, TargetInfo) else target_info(target)


def _target_programs(target: TargetInfo) -> int:
    """Programs a phased level aims at (:data:`TARGET_PROGRAMS` if set)."""
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    return 8 * target.sm_count if target.cuda else 4


def _block_tokens(d: int, f64: bool, cuda: bool) -> Tuple[int, int]:
    """(padded dimension, tokens per block) of the token loops.

    On the GPU a block holds 2048 float32 values (64 tokens of 32 dims,
    about 128 registers per thread at 4 warps: four programs per
    multiprocessor); 128 tokens would take 220 registers. The interpreter
    runs larger blocks faster (fewer Python-level ops).
    """
    dp = max(8, triton.next_power_of_2(d))
    values = (2048 if cuda else 4096) // (2 if f64 else 1)
    return dp, max(16, min(BLOCK_TOKENS, values // dp))


class LevelPlan(NamedTuple):
    """How a level of the clustering runs (see the module docstring).

    Attributes:
        kind (str): ``'subtree'``: one program per node of the first such
            level does it and every level below it (one launch for them
            all); ``'phased'``: ``chunks`` programs per node and phase.
        chunks (int): Programs per node and phase (1 for ``'subtree'``).
        chunk_size (int): Slots per chunk, a power of two (for
            ``'subtree'`` the node's slots).
    """
    kind: str
    chunks: int
    chunk_size: int


def level_plans(rows: int, num_levels: int, slot_size: int,
                target: Union[TargetInfo, torch.device]) -> List[LevelPlan]:
    """The :class:`LevelPlan` of every level of a clustering.

    It depends on shapes only, so it is the same for every call at a
    resolution.

    The first level whose nodes fit :data:`SORT_MAX` slots and every
    level below it take the subtree schedule, whatever the grid (few
    programs at batch 1; the deep levels are short). Above it, nodes are
    cut into chunks of a power-of-two length in ``[MIN_CHUNK,
    CHUNK_MAX]``, as many as reach the target (:data:`TARGET_PROGRAMS`).

    Args:
        rows (int): Rows (samples x heads) clustered.
        num_levels (int): Levels of the binary tree.
        slot_size (int): Slots per leaf cluster.
        target (TargetInfo | torch.device): The device, or a
            :class:`TargetInfo` (a model can pass CUDA's).

    Returns:
        list[LevelPlan]: One per level, the first (root) level first.
    """
    programs = _target_programs(_as_target(target))
    lo = triton.next_power_of_2(max(1, MIN_CHUNK))
    hi = max(lo, triton.next_power_of_2(max(1, CHUNK_MAX)))
    plans = []
    for level in range(num_levels):
        nodes, cap = rows << level, slot_size << (num_levels - level)
        if cap <= SORT_MAX:
            # This level and every one below it: one launch.
            plans += [
                LevelPlan('subtree', 1, slot_size << (num_levels - lv))
                for lv in range(level, num_levels)
            ]
            break
        want = -(-programs // nodes)
        chunk = max(lo, min(hi, triton.next_power_of_2(-(-cap // want))))
        plans.append(LevelPlan('phased', -(-cap // chunk), chunk))
    return plans


def _check_args(x: Tensor, num_levels: int, slot_size: int,
                kmeans_iters: int) -> None:
    """Raise a ValueError naming the first bad argument of the kernel."""
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


def balanced_clustering(x: Tensor,
                        num_levels: int,
                        slot_size: int,
                        kmeans_iters: int,
                        temperature: float,
                        target: Optional[TargetInfo] = None) -> Tensor:
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
        target (TargetInfo, optional): The device to schedule for; None:
            :data:`TARGET` if set, else ``x``'s (a model of the GPU passes
            CUDA's to the interpreter).

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
    if target is None:
        target = _target_for(device)
    f64 = x.dtype == torch.float64
    if x.dtype not in (torch.float64, torch.float32, torch.bfloat16,
                       torch.float16):
        x = x.float()
    x = x.contiguous()
    cdt = torch.float64 if f64 else torch.float32
    DP, BT = _block_tokens(d, f64, target.cuda)
    plans = level_plans(M, L, S, target)
    # One launch per phased level, then one for the subtree below them
    # (none when SORT_MAX is below the leaves' parents).
    top = next((lv for lv, p in enumerate(plans) if p.kind == 'subtree'), L)
    plans = plans[:top + 1]
    programs = [(M << lv) * p.chunks for lv, p in enumerate(plans)]
    phases = [
        int(lv == 0) + kmeans_iters + 2 if p.kind == 'phased' else 0
        for lv, p in enumerate(plans)
    ]
    # Initial centroid sums a split leaves its children (parent, source
    # chunk, child, 2, DP): two buffers in turn; k-means partial sums of a
    # phased level (2, node, chunk, 2, DP).
    parts = [
        torch.empty(max(programs) * 4 * DP, dtype=cdt, device=device)
        for _ in range(2)
    ]
    step_numel = max(n for n, k in zip(programs, phases)
                     if k) if any(phases) else 1
    step = torch.empty(2 * step_numel * 2 * DP, dtype=cdt, device=device)
    # Tokens of every slot between phased levels (level 0 needs none: slot
    # i holds token i); the subtree's own (two halves per node), its keys
    # and order.
    perms = [
        torch.empty(M * total if top else 1, dtype=torch.int32, device=device)
        for _ in range(2)
    ]
    work = torch.empty(2 * M * total, dtype=torch.int32, device=device)
    out = torch.empty(M, total, dtype=torch.long, device=device)
    keys = torch.empty(
        max(n * p.chunk_size for n, p in zip(programs, plans)),
        dtype=torch.int64,
        device=device)
    order = torch.empty(M * total, dtype=torch.int32, device=device)
    # Tickets and done-counters of the phased levels, zeroed once.
    # (Rounded to 16 bytes: Triton compiles again for unaligned pointers.)
    sync_sizes = [
        -(-(1 + k * (M << lv)) // 4) * 4 if k else 0
        for lv, k in enumerate(phases)
    ]
    sync = (
        torch.zeros(sum(sync_sizes), dtype=torch.int32, device=device)
        if any(phases) else None)
    # float64 math reads the temperature from a tensor (a float argument
    # reaches a kernel as float32; the float32 math's value).
    temp = (
        torch.full((1, ), float(temperature), dtype=cdt, device=device)
        if f64 else float(temperature))
    consts = dict(F64=f64, CT=tl.float64 if f64 else tl.float32, DP=DP)
    # Counting ranks (float64) compare TILE x TILE keys at a time; larger
    # tiles only pay in the interpreter.
    tile = 32 if target.cuda else 128
    search_values = SEARCH_VALUES or (2048 if target.cuda else 8192)
    # Partial sums reduced at a time.
    sum_block = 16 if target.cuda else 64
    sync_off = 0
    ns = 1  # sources of the sums the previous split left per node
    for lv, plan in enumerate(plans):
        nodes, rows, cap = 1 << lv, M << lv, total >> lv
        first, last = lv == 0, lv + 1 == L
        perm_in = perms[lv % 2]
        perm_out = out if last else perms[(lv + 1) % 2]
        part_in, part_out = parts[lv % 2], parts[(lv + 1) % 2]
        shape = (N, d, cap, nodes, G >> lv, N // G, N % G, kmeans_iters, ns)
        if plan.kind == 'subtree':
            # The passes of all the subtree's levels run one after the other
            # in one program: larger blocks (fewer dependent gathers), more
            # warps.
            values = SUBTREE_BLOCK_VALUES or (2048 if target.cuda else 4096)
            node_bt = max(
                16,
                min(
                    triton.next_power_of_2(cap),
                    values // DP // (2 if f64 else 1)))
            # Sub-nodes of at most rt slots are held in registers.
            rt = max(
                16,
                min(
                    triton.next_power_of_2(cap),
                    (RESIDENT_VALUES or 4096) // DP // (2 if f64 else 1)))
            log = (cap - 1).bit_length()
            # (Sixteen warps hold a 128 x 32 tile without spilling next to
            # the sort; 256 x 32 spill at any warp count up to 16.)
            warps = 8 if f64 or log > 9 or node_bt * DP > 2048 else 4
            if rt * DP * (2 if f64 else 1) >= 4096:
                warps = 16
            _subtree_kernel[(rows, )](
                x,
                perm_in,
                out,
                part_in,
                work,
                keys,
                order,
                temp,
                *shape,
                L - lv,
                HAS_PARTS=not first,
                FIRST=first,
                BT=node_bt,
                RT=rt,
                SB=sum_block,
                LOG=log,
                TILE=tile,
                num_warps=warps,
                # (ptxas otherwise caps registers below what the level's
                # sort and a pass need together, and spills.)
                maxnreg=min(255, 65536 // (32 * warps)) if f64 else 128,
                **consts)
            break
        ch = plan.chunk_size
        rb = min(BT, ch)
        _level_kernel[(programs[lv] * phases[lv], )](
            x,
            perm_in,
            perm_out,
            part_in,
            part_out,
            step,
            keys,
            sync[sync_off:sync_off + sync_sizes[lv]],
            temp,
            *shape,
            plan.chunks,
            rows,
            FIRST=first,
            LAST=last,
            BT=BT,
            SB=sum_block,
            CH=ch,
            LOG=ch.bit_length() - 1,
            RB=rb,
            # (Not fitted to the chunk count: no variant per count; masked
            # probes load nothing.)
            CB=max(1, search_values // rb),
            TILE=tile,
            num_warps=4,
            # (Without a bound ptxas may cap registers at 128 and spill:
            # float64 needs about 140.)
            maxnreg=255 if f64 else 128,
            **consts)
        sync_off += sync_sizes[lv]
        ns = plan.chunks
    return out
