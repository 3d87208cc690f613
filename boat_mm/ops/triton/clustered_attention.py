# Copyright (c) boat-mm contributors. All rights reserved.
"""Triton kernels of ``boat_mm::clustered_attention`` and its backward.

They compute what the C++ CPU op (``boat_mm/ops/csrc/
clustered_attention.cpp``) computes, FlashAttention-style, on the GPU (or
on CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``, which the
tests use):

- The forward runs one program per ``(cluster, sample * head)``: grid
  ``(G, B * h)``, fixed by the plan (as the backward's), so launches need
  no host-device synchronisation and CUDA graphs can capture them. The
  real-token count of a cluster is read on the device from
  ``slot_valid`` (real slots first, as in every
  :class:`~boat_mm.ops.ClusterPlan`).
- A program loads the q, k and v rows of its tokens straight from the
  ``(B, N, 3C)`` qkv through ``perm`` (no permuted copies) into one tile
  of ``BLOCK_S`` rows (its queries and its own keys; for 65-80 slots a
  64-row tile and an ``EXTRA`` tile of 16 rows, whose products and
  shared memory are a fraction of one 128-row tile's), and the keys it
  borrows from its sibling (the first ``overlap`` of cluster ``2j+1`` for
  ``2j``, the last ones of ``2j`` for ``2j+1``) into a tail tile of
  ``TAIL`` rows sized to the overlap, so that few masked-out products
  run; softmax in float32 (float64 for float64 inputs). It writes the
  outputs to their raster rows, the log-sum-exp per slot and, with an
  image shape, the values of its tokens as the channels-last
  ``(B, C, H, W)`` image of FSLA's local term (a token's channels are
  contiguous: coalesced stores).
- The backward recomputes the probabilities from the log-sum-exp, in one
  launch of one program per sibling pair ``(2j, 2j+1)`` and sample *
  head: grid ``(ceil(G / 2), B * h)``; a cluster without a sibling (a
  plan of one cluster) attends within itself. The program runs the two
  clusters' queries one after the other; as it holds every key of a
  cluster's queries, it computes ``D_i = sum_j P_ij dP_ij`` and the
  query, key and value gradients in one pass (five products per query
  and key). It takes ``2j``'s slots rotated so that the keys ``2j+1``
  borrows are its first rows, as the keys ``2j`` borrows are ``2j+1``'s:
  the lent keys' gradients from the two clusters' queries then add up
  row by row. They meet in a scratch of ``TAIL``-row tiles per program
  (four for 16-bit inputs, whose second pass completes the lent keys;
  six for 32- and 64-bit ones, added up after both passes, as their
  float32 products spill otherwise) that the same program writes and
  reads back after a barrier: a register tile cannot be handed from one
  pass to the other without the compiler keeping both passes' values
  alive at once (hundreds of registers and spills on sm_90), so each
  pass is a separate (``noinline``) function of scalar arguments. Every
  row of the qkv gradient is written once, by one program:
  deterministic, no atomics, no second kernel.
- The slot size, overlap, token count and cluster count are run-time
  arguments Triton does not specialise on; only their power-of-two tile
  sizes are compile-time, so a new resolution in the same bucket does not
  compile again.

Inputs of float32 (products in IEEE float32 unless
``torch.backends.cuda.matmul.allow_tf32``), bfloat16 and float16
(float32 accumulation and log-sum-exp) and float64 (float64 throughout,
for exact tests).
"""
import contextlib
import functools
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

# _lse_dtype: float32 for 16-bit inputs (their rounding would spoil the
# recomputed probabilities), else the input dtype: what the fake kernel
# says.
from .. import _library
from .._library import KernelResourcesError, _lse_dtype

__all__ = [
    'clustered_attention_forward', 'clustered_attention_backward',
    'interpreted', 'too_large_for_gpu'
]


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter.

    ``TRITON_INTERPRET`` decided it when this module was imported.

    Returns:
        bool: True in the interpreter.
    """
    return not isinstance(_forward_kernel, triton.runtime.JITFunction)


@triton.jit
def _count(valid, c, G, S, BLOCK: tl.constexpr, EXTRA: tl.constexpr):
    """Real-token count of cluster ``c`` (real slots come first; 0 for a
    sibling that does not exist, ``c >= G``), whose slots fill a
    ``BLOCK``-row tile and an ``EXTRA``-row one."""
    offs = tl.arange(0, BLOCK)
    ok = (offs < S) & (c < G)
    n = tl.sum(tl.load(valid + c * S + offs, mask=ok, other=0).to(tl.int32))
    if EXTRA > 0:
        offs_x = BLOCK + tl.arange(0, EXTRA)
        ok_x = (offs_x < S) & (c < G)
        n += tl.sum(
            tl.load(valid + c * S + offs_x, mask=ok_x, other=0).to(tl.int32))
    return n


@triton.jit
def _cluster(qkv, perm, valid, N, C, perm_stride, S, G, HEADS: tl.constexpr,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
             EXTRA: tl.constexpr):
    """What every kernel first reads of its program's cluster ``c`` and
    its sibling: real-token counts, the raster tokens of ``c``'s ``S``
    slots that fill a ``BLOCK``-row tile, and the qkv pointer of the
    program's sample and head."""
    c = tl.program_id(0)
    m = tl.program_id(1)
    b = (m // HEADS).to(tl.int64)
    head = m % HEADS
    sib = c ^ 1
    offs = tl.arange(0, BLOCK)
    in_slots = offs < S
    # Real tokens come first in a cluster's slots: count them.
    n_own = _count(valid, c, G, S, BLOCK, EXTRA)
    n_sib = _count(valid, sib, G, S, BLOCK, EXTRA)  # 0: no sibling
    row = m.to(tl.int64) * perm_stride
    real = offs < n_own
    tok = tl.load(perm + row + c * S + offs, mask=real, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = qkv + b * N * (3 * C) + head * D
    return (c, m, b, head, sib, offs, in_slots, n_own, n_sib, row, real, tok,
            offs_d, d_ok, base)


@triton.jit
def _borrowed(perm, row, c, sib, S, n_sib, overlap, TAIL: tl.constexpr):
    """The keys cluster ``c`` borrows from its sibling (the first
    ``overlap`` of ``2j+1`` for ``2j``, the last ones of ``2j`` for
    ``2j+1``) as a ``TAIL``-row tile: raster tokens and validity."""
    n_borrow = tl.minimum(n_sib, overlap)
    first = sib * S + tl.where(c % 2 == 0, 0, n_sib - n_borrow)
    j = tl.arange(0, TAIL)
    ok = j < n_borrow
    tok = tl.load(perm + row + first + j, mask=ok, other=0)
    return tok, ok


@triton.jit
def _rows(base, tok, mask, offs_d, C, OFFSET: tl.constexpr,
          UPCAST: tl.constexpr):
    """The q (``OFFSET`` 0), k (1) or v (2) rows of raster tokens ``tok``
    (float32 under ``UPCAST``)."""
    x = tl.load(
        base + OFFSET * C + tok[:, None] * (3 * C) + offs_d[None, :],
        mask=mask,
        other=0.)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend(q, k, v, real, kx, vx, real_x, kt, vt, t_ok, scale, scale_lo,
            EXTRA: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Queries ``q`` against the cluster's own keys (``k``, ``v``; and
    ``kx``, ``vx`` of the overflow tile with ``EXTRA``) and its borrowed
    ones (``kt``, ``vt``), ``real``, ``real_x`` and ``t_ok`` marking the
    real keys: the outputs and the log-sum-exp."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    s = tl.where(real[None, :], s * scale + s * scale_lo, float('-inf'))
    st = tl.dot(q, tl.trans(kt), input_precision=PRECISION, out_dtype=ACC)
    st = tl.where(t_ok[None, :], st * scale + st * scale_lo, float('-inf'))
    m_i = tl.maximum(tl.max(s, 1), tl.max(st, 1))
    if EXTRA > 0:
        sx = tl.dot(q, tl.trans(kx), input_precision=PRECISION, out_dtype=ACC)
        sx = tl.where(real_x[None, :], sx * scale + sx * scale_lo,
                      float('-inf'))
        m_i = tl.maximum(m_i, tl.max(sx, 1))
    p = tl.exp(s - m_i[:, None])
    pt = tl.exp(st - m_i[:, None])
    l_i = tl.sum(p, 1) + tl.sum(pt, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
    acc += tl.dot(
        pt.to(vt.dtype), vt, input_precision=PRECISION, out_dtype=ACC)
    if EXTRA > 0:
        px = tl.exp(sx - m_i[:, None])
        l_i += tl.sum(px, 1)
        acc += tl.dot(
            px.to(vx.dtype), vx, input_precision=PRECISION, out_dtype=ACC)
    return acc / l_i[:, None], m_i + tl.log(l_i)


@triton.jit
def _store_rows(out, image, lse, o, v, lse_val, rows, mask, lse_at, real,
                in_slots, HAS_IMAGE: tl.constexpr):
    """A query tile's outputs (and values, for the image) at ``rows``, its
    log-sum-exp at ``lse_at`` (0 for padding slots, as in the CPU op)."""
    tl.store(out + rows, o.to(out.dtype.element_ty), mask=mask)
    if HAS_IMAGE:
        tl.store(image + rows, v.to(image.dtype.element_ty), mask=mask)
    lse_val = tl.where(real, lse_val, 0.)
    tl.store(lse + lse_at, lse_val.to(lse.dtype.element_ty), mask=in_slots)


@triton.jit(do_not_specialize=['N', 'perm_stride', 'S', 'overlap', 'G'])
def _forward_kernel(qkv, perm, valid, out, lse, image, N, C, perm_stride, S,
                    overlap, G, scale, scale_lo, HEADS: tl.constexpr,
                    D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr, EXTRA: tl.constexpr,
                    TAIL: tl.constexpr, HAS_IMAGE: tl.constexpr,
                    ACC: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Cluster ``c = program_id(0)`` of one sample and head
    (``program_id(1)``): its queries' outputs, values and log-sum-exps."""
    (c, m, b, head, sib, offs, in_slots, n_own, n_sib, row, real, tok, offs_d,
     d_ok, base) = _cluster(qkv, perm, valid, N, C, perm_stride, S, G, HEADS,
                            D, BLOCK_D, BLOCK_S, EXTRA)
    mask = real[:, None] & d_ok[None, :]
    # The cluster's own tokens are its queries and its first keys; slots
    # past BLOCK_S fill the overflow tile (EXTRA rows).
    q = _rows(base, tok, mask, offs_d, C, 0, UPCAST)
    k = _rows(base, tok, mask, offs_d, C, 1, UPCAST)
    v = _rows(base, tok, mask, offs_d, C, 2, UPCAST)
    if EXTRA > 0:
        offs_x = BLOCK_S + tl.arange(0, EXTRA)
        real_x = offs_x < n_own
        tok_x = tl.load(perm + row + c * S + offs_x, mask=real_x, other=0)
        mask_x = real_x[:, None] & d_ok[None, :]
        qx = _rows(base, tok_x, mask_x, offs_d, C, 0, UPCAST)
        kx = _rows(base, tok_x, mask_x, offs_d, C, 1, UPCAST)
        vx = _rows(base, tok_x, mask_x, offs_d, C, 2, UPCAST)
    else:
        real_x, kx, vx = None, None, None
    t_tok, t_ok = _borrowed(perm, row, c, sib, S, n_sib, overlap, TAIL)
    t_mask = t_ok[:, None] & d_ok[None, :]
    kt = _rows(base, t_tok, t_mask, offs_d, C, 1, UPCAST)
    vt = _rows(base, t_tok, t_mask, offs_d, C, 2, UPCAST)

    o, lse_val = _attend(q, k, v, real, kx, vx, real_x, kt, vt, t_ok, scale,
                         scale_lo, EXTRA, ACC, PRECISION)
    # out (B, N, C) and the channels-last value image share the layout.
    rows = (b * N + tok[:, None]) * C + head * D + offs_d[None, :]
    _store_rows(out, image, lse, o, v, lse_val, rows, mask, row + c * S + offs,
                real, in_slots, HAS_IMAGE)
    if EXTRA > 0:
        o, lse_val = _attend(qx, k, v, real, kx, vx, real_x, kt, vt, t_ok,
                             scale, scale_lo, EXTRA, ACC, PRECISION)
        rows = (b * N + tok_x[:, None]) * C + head * D + offs_d[None, :]
        _store_rows(out, image, lse, o, vx, lse_val, rows, mask_x,
                    row + c * S + offs_x, real_x, offs_x < S, HAS_IMAGE)


@triton.jit
def _probs(q, do, lse_i, k, v, ok, scale, scale_lo, ACC: tl.constexpr,
           PRECISION: tl.constexpr):
    """The probabilities ``P`` of queries ``q`` (log-sum-exp ``lse_i``)
    for keys ``k`` (``ok`` marking the real ones) and ``dP = dO V^T``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    p = tl.where(ok[None, :],
                 tl.exp(s * scale + s * scale_lo - lse_i[:, None]), 0.)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
    return p, dp


@triton.jit
def _dscores(q, do, lse_i, k, v, real, kx, vx, real_x, kt, vt, t_ok, scale,
             scale_lo, EXTRA: tl.constexpr, ACC: tl.constexpr,
             PRECISION: tl.constexpr):
    """For a query tile against all its keys (own; own in the overflow
    tile, with ``EXTRA``; borrowed): ``dS`` and ``P`` per key tile, in the
    input dtype, and the q gradient (unscaled). Every key of these
    queries is here, so ``D_i = sum_j P_ij dP_ij`` needs no other pass
    (five products per query and key)."""
    p, dp = _probs(q, do, lse_i, k, v, real, scale, scale_lo, ACC, PRECISION)
    pt, dpt = _probs(q, do, lse_i, kt, vt, t_ok, scale, scale_lo, ACC,
                     PRECISION)
    delta = tl.sum(p * dp, 1) + tl.sum(pt * dpt, 1)
    if EXTRA > 0:
        px, dpx = _probs(q, do, lse_i, kx, vx, real_x, scale, scale_lo, ACC,
                         PRECISION)
        delta += tl.sum(px * dpx, 1)
        dsx = (px * (dpx - delta[:, None])).to(q.dtype)
        px = px.to(do.dtype)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dst = (pt * (dpt - delta[:, None])).to(q.dtype)
    # The products below take P in the input dtype: the float32 tiles can
    # go now.
    p, pt = p.to(do.dtype), pt.to(do.dtype)
    dq = tl.dot(ds, k, input_precision=PRECISION, out_dtype=ACC)
    dq += tl.dot(dst, kt, input_precision=PRECISION, out_dtype=ACC)
    if EXTRA > 0:
        dq += tl.dot(dsx, kx, input_precision=PRECISION, out_dtype=ACC)
    else:
        dsx, px = ds, p  # unused: a compiled function returns tensors
    return dq, ds, p, dst, pt, dsx, px


@triton.jit
def _dot_t(a, b, acc, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a^T b`` (``acc`` None: zeros), in ``ACC``."""
    return tl.dot(
        tl.trans(a), b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit(noinline=True)
def _pair_pass(grad_out, grad_image, qkv, perm, lse, grad, scratch, N, C, S,
               row, pair, m, c, n_c, shift, lend, t_first, n_t, second, scale,
               scale_lo, HEADS: tl.constexpr, D: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
               EXTRA: tl.constexpr, TAIL: tl.constexpr,
               HAS_IMAGE: tl.constexpr, ACC: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               LENT_IN_PASS: tl.constexpr):
    """The queries of cluster ``c`` of the program's sibling pair (the
    first, ``2j``, when ``second`` is 0) against their keys: its ``n_c``
    tokens (slots rotated by ``shift``, so that the ``lend`` keys its
    sibling borrows are its first rows; slots past ``BLOCK_S`` in an
    ``EXTRA``-row overflow tile) and the ``n_t`` it borrows (slots from
    ``t_first``: its sibling's lent keys). Stores the q gradients and the
    k and v gradients that these queries complete."""
    b = (m // HEADS).to(tl.int64)
    head = m % HEADS
    offs = tl.arange(0, BLOCK_S)
    j = tl.arange(0, TAIL)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    o_base = b * N * C + head * D
    g_base = 3 * b * N * C + head * D
    base = qkv + g_base
    real = offs < n_c
    slot = row + c * S + (offs + shift) % tl.maximum(n_c, 1)
    tok = tl.load(perm + slot, mask=real, other=0)
    t_ok = j < n_t
    t_tok = tl.load(perm + row + t_first + j, mask=t_ok, other=0)

    mask = real[:, None] & d_ok[None, :]
    q = _rows(base, tok, mask, offs_d, C, 0, UPCAST)
    k = _rows(base, tok, mask, offs_d, C, 1, UPCAST)
    v = _rows(base, tok, mask, offs_d, C, 2, UPCAST)
    t_mask = t_ok[:, None] & d_ok[None, :]
    kt = _rows(base, t_tok, t_mask, offs_d, C, 1, UPCAST)
    vt = _rows(base, t_tok, t_mask, offs_d, C, 2, UPCAST)
    # grad_out (B, N, C) and the channels-last image share the layout.
    out_at = o_base + tok[:, None] * C + offs_d[None, :]
    do = tl.load(grad_out + out_at, mask=mask, other=0.).to(q.dtype)
    lse_i = tl.load(lse + slot, mask=real, other=0.).to(ACC)
    ty = grad.dtype.element_ty
    if EXTRA > 0:
        # The overflow tile: never lent (lend <= overlap <= BLOCK_S).
        offs_x = BLOCK_S + tl.arange(0, EXTRA)
        real_x = offs_x < n_c
        slot_x = row + c * S + (offs_x + shift) % tl.maximum(n_c, 1)
        tok_x = tl.load(perm + slot_x, mask=real_x, other=0)
        mask_x = real_x[:, None] & d_ok[None, :]
        qx = _rows(base, tok_x, mask_x, offs_d, C, 0, UPCAST)
        kx = _rows(base, tok_x, mask_x, offs_d, C, 1, UPCAST)
        vx = _rows(base, tok_x, mask_x, offs_d, C, 2, UPCAST)
        out_at_x = o_base + tok_x[:, None] * C + offs_d[None, :]
        dox = tl.load(grad_out + out_at_x, mask=mask_x, other=0.).to(q.dtype)
        lse_x = tl.load(lse + slot_x, mask=real_x, other=0.).to(ACC)
        g_at_x = grad + g_base + tok_x[:, None] * (3 * C) + offs_d[None, :]
    else:
        real_x, qx, kx, vx, dox = None, None, None, None, None

    if EXTRA > 0:
        # The overflow tile's queries first: their parts of the key
        # gradients wait in float32 accumulators, which take fewer
        # registers than their dS and P would beside the first tile's.
        dq, ds, p, dst, pt, dsx, px = _dscores(qx, dox, lse_x, k, v, real, kx,
                                               vx, real_x, kt, vt, t_ok, scale,
                                               scale_lo, EXTRA, ACC, PRECISION)
        tl.store(g_at_x, (dq * scale + dq * scale_lo).to(ty), mask=mask_x)
        x_dk = _dot_t(ds, qx, None, ACC, PRECISION)
        x_dv = _dot_t(p, dox, None, ACC, PRECISION)
        x_dkt = _dot_t(dst, qx, None, ACC, PRECISION)
        x_dvt = _dot_t(pt, dox, None, ACC, PRECISION)
        dkx = _dot_t(dsx, qx, None, ACC, PRECISION)
        dvx = _dot_t(px, dox, None, ACC, PRECISION)
        if HAS_IMAGE:
            dvx += tl.load(
                grad_image + out_at_x, mask=mask_x, other=0.).to(ACC)

    # The first tile's queries: dS and P by own keys (ds, p), overflow
    # keys (dsx, px) and borrowed keys (dst, pt).
    dq, ds, p, dst, pt, dsx, px = _dscores(q, do, lse_i, k, v, real, kx, vx,
                                           real_x, kt, vt, t_ok, scale,
                                           scale_lo, EXTRA, ACC, PRECISION)
    g_at = grad + g_base + tok[:, None] * (3 * C) + offs_d[None, :]
    tl.store(g_at, (dq * scale + dq * scale_lo).to(ty), mask=mask)

    # The pair's scratch, TAIL x D tiles of k (unscaled) and v gradients
    # of lent keys: [0, 1] 2j's own part of its lent keys, [2, 3] 2j's
    # queries' part of 2j+1's, [4, 5] 2j+1's queries' part of 2j's
    # (without LENT_IN_PASS).
    cell = scratch + (m.to(tl.int64) * tl.num_programs(0) + pair) * (
        (4 if LENT_IN_PASS else 6) * TAIL * D)
    at = cell + offs[:, None] * D + offs_d[None, :]
    lent = (offs < lend)[:, None] & d_ok[None, :]
    # Own keys: 2j's but the lent ones; all of 2j+1's, with 2j's queries'
    # part of its lent keys.
    done = mask & ((offs >= lend) | (second != 0))[:, None]
    dk = tl.load(at + 2 * TAIL * D, mask=lent & (second != 0), other=0.)
    if EXTRA > 0:
        dk += x_dk
    dk = _dot_t(ds, q, dk, ACC, PRECISION)
    tl.store(g_at + C, (dk * scale + dk * scale_lo).to(ty), mask=done)
    tl.store(at, dk, mask=lent & (second == 0))
    dv = tl.load(at + 3 * TAIL * D, mask=lent & (second != 0), other=0.)
    if HAS_IMAGE:
        dv += tl.load(grad_image + out_at, mask=mask, other=0.).to(ACC)
    if EXTRA > 0:
        dv += x_dv
    dv = _dot_t(p, do, dv, ACC, PRECISION)
    tl.store(g_at + 2 * C, dv.to(ty), mask=done)
    tl.store(at + TAIL * D, dv, mask=lent & (second == 0))
    if EXTRA > 0:
        dkx = _dot_t(dsx, q, dkx, ACC, PRECISION)
        tl.store(
            g_at_x + C, (dkx * scale + dkx * scale_lo).to(ty), mask=mask_x)
        dvx = _dot_t(px, do, dvx, ACC, PRECISION)
        tl.store(g_at_x + 2 * C, dvx.to(ty), mask=mask_x)
    # Borrowed keys: 2j's queries' part of 2j+1's lent keys ([2, 3]);
    # 2j+1's queries' part of 2j's, which completes them with [0, 1]
    # (LENT_IN_PASS) or goes to [4, 5] for the kernel to add up. (The
    # float32 products of 32-bit inputs spill with the former on sm_90.)
    t_at = cell + j[:, None] * D + offs_d[None, :]
    if LENT_IN_PASS:
        complete = t_mask & (second != 0)
        dkt = tl.load(t_at, mask=complete, other=0.)
        dvt = tl.load(t_at + TAIL * D, mask=complete, other=0.)
        if EXTRA > 0:
            dkt += x_dkt
            dvt += x_dvt
        left = t_mask & (second == 0)
        t_at += 2 * TAIL * D
    else:
        if EXTRA > 0:
            dkt, dvt = x_dkt, x_dvt
        else:
            dkt, dvt = None, None
        left = t_mask
        t_at += (2 + 2 * second) * TAIL * D
    dkt = _dot_t(dst, q, dkt, ACC, PRECISION)
    tl.store(t_at, dkt, mask=left)
    dvt = _dot_t(pt, do, dvt, ACC, PRECISION)
    tl.store(t_at + TAIL * D, dvt, mask=left)
    if LENT_IN_PASS:
        tg_at = grad + g_base + t_tok[:, None] * (3 * C) + offs_d[None, :]
        tl.store(
            tg_at + C, (dkt * scale + dkt * scale_lo).to(ty), mask=complete)
        tl.store(tg_at + 2 * C, dvt.to(ty), mask=complete)


@triton.jit
def _add_lent(perm, grad, scratch, N, C, S, row, pair, m, a, n_a, lend_a,
              scale, scale_lo, HEADS: tl.constexpr, D: tl.constexpr,
              BLOCK_D: tl.constexpr, TAIL: tl.constexpr):
    """The k and v gradients of 2j's lent keys: its own queries' part
    and 2j+1's, from the scratch's tiles [0, 1] and [4, 5]."""
    j = tl.arange(0, TAIL)
    offs_d = tl.arange(0, BLOCK_D)
    ok = j < lend_a
    tok = tl.load(perm + row + a * S + n_a - lend_a + j, mask=ok, other=0)
    mask = ok[:, None] & (offs_d < D)[None, :]
    cell = scratch + (m.to(tl.int64) * tl.num_programs(0) +
                      pair) * (6 * TAIL * D) + j[:, None] * D + offs_d[None, :]
    dk = tl.load(cell, mask=mask) + tl.load(cell + 4 * TAIL * D, mask=mask)
    dv = tl.load(
        cell + TAIL * D, mask=mask) + tl.load(
            cell + 5 * TAIL * D, mask=mask)
    b = (m // HEADS).to(tl.int64)
    at = grad + (b * N + tok[:, None]) * (3 * C) + (m % HEADS) * D + C
    ty = grad.dtype.element_ty
    tl.store(
        at + offs_d[None, :], (dk * scale + dk * scale_lo).to(ty), mask=mask)
    tl.store(at + C + offs_d[None, :], dv.to(ty), mask=mask)


@triton.jit(do_not_specialize=['N', 'perm_stride', 'S', 'overlap', 'G'])
def _backward_kernel(grad_out, grad_image, qkv, perm, valid, lse, grad,
                     scratch, N, C, perm_stride, S, overlap, G, scale,
                     scale_lo, HEADS: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                     EXTRA: tl.constexpr, TAIL: tl.constexpr,
                     HAS_IMAGE: tl.constexpr, ACC: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     LENT_IN_PASS: tl.constexpr):
    """The sibling pair ``(2j, 2j+1)``, ``j = program_id(0)``, of one
    sample and head: the q gradients of both clusters' queries and the k
    and v gradients of all their tokens (``2j`` alone when it has no
    sibling)."""
    pair = tl.program_id(0)
    m = tl.program_id(1)
    a = 2 * pair
    n_a = _count(valid, a, G, S, BLOCK_S, EXTRA)
    n_b = _count(valid, a + 1, G, S, BLOCK_S, EXTRA)  # 0: no sibling
    # The keys each cluster lends the other: the last lend_a of 2j, the
    # first lend_b of 2j+1.
    lend_a = tl.where(n_b > 0, tl.minimum(n_a, overlap), 0)
    lend_b = tl.minimum(n_b, overlap)
    row = m.to(tl.int64) * perm_stride
    # 2j's slots are taken rotated, its lent keys first: a cluster's lent
    # keys are then the first rows of its tile and of its sibling's tile
    # of borrowed keys.
    _pair_pass(grad_out, grad_image, qkv, perm, lse, grad, scratch, N, C, S,
               row, pair, m, a, n_a, n_a - lend_a, lend_a, (a + 1) * S, lend_b,
               0, scale, scale_lo, HEADS, D, BLOCK_D, BLOCK_S, EXTRA, TAIL,
               HAS_IMAGE, ACC, PRECISION, UPCAST, LENT_IN_PASS)
    if n_b > 0:
        # 2j's scratch rows, written by other threads of this program.
        tl.debug_barrier()
        _pair_pass(grad_out, grad_image, qkv, perm, lse, grad, scratch, N, C,
                   S, row, pair, m, a + 1, n_b, 0, lend_b,
                   a * S + n_a - lend_a, lend_a, 1, scale, scale_lo, HEADS, D,
                   BLOCK_D, BLOCK_S, EXTRA, TAIL, HAS_IMAGE, ACC, PRECISION,
                   UPCAST, LENT_IN_PASS)
    if not LENT_IN_PASS:
        if n_b > 0:
            tl.debug_barrier()
            _add_lent(perm, grad, scratch, N, C, S, row, pair, m, a, n_a,
                      lend_a, scale, scale_lo, HEADS, D, BLOCK_D, TAIL)


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check(qkv: Tensor, perm: Tensor, slot_valid: Tensor, num_heads: int,
           slot_size: int, overlap: int) -> Tuple[int, int, int, int]:
    """Checks from shapes and dtypes only (no synchronisation); returns
    ``(B, N, C, G)``."""
    if qkv.dim() != 3 or qkv.shape[2] % 3:
        raise RuntimeError(f'clustered_attention expects qkv of shape '
                           f'(B, N, 3 * C), got {tuple(qkv.shape)}')
    if qkv.dtype not in _SUPPORTED:
        raise RuntimeError(
            f"clustered_attention's Triton kernels support float32, "
            f"bfloat16, float16 and float64, got {qkv.dtype}; use "
            f"impl='tensor'")
    B, N, C3 = qkv.shape
    C = C3 // 3
    if num_heads < 1 or C % num_heads:
        raise RuntimeError(
            f'num_heads ({num_heads}) must divide the {C} channels')
    if slot_size < 1 or overlap < 0:
        raise RuntimeError(f'slot_size must be >= 1 and overlap >= 0, got '
                           f'{slot_size} and {overlap}')
    if slot_valid.dim() != 1 or slot_valid.dtype != torch.bool:
        raise RuntimeError(f'slot_valid must be a 1-d bool tensor, got '
                           f'{tuple(slot_valid.shape)} {slot_valid.dtype}')
    slots = slot_valid.shape[0]
    if slots != slot_size and (slots == 0 or slots % (2 * slot_size)):
        raise RuntimeError(f'slot_valid must cover whole sibling pairs of '
                           f'2 * {slot_size} slots (or the {slot_size} of '
                           f'one cluster), got {slots}')
    if (perm.dim() != 2 or perm.dtype != torch.long
            or perm.shape[0] != B * num_heads or perm.shape[1] != slots):
        raise RuntimeError(
            f'perm must be int64 of shape (B * num_heads, slots) = '
            f'({B * num_heads}, {slots}), the clustering\'s of this slot '
            f'layout, got {tuple(perm.shape)} {perm.dtype}')
    for t in (perm, slot_valid):
        if t.device != qkv.device:
            raise RuntimeError(f'perm and slot_valid must be on the device '
                               f'of qkv ({qkv.device}), got {t.device}')
    if qkv.device.type == 'cpu' and not interpreted():
        raise RuntimeError(
            'The Triton kernels got CPU tensors but were compiled for the '
            'GPU: set TRITON_INTERPRET=1 before the first Triton call of '
            "the process to run them in Triton's interpreter, or use "
            "impl='cpp' or 'tensor' on the CPU.")
    if B * num_heads > _library.MAX_GRID_ROWS:
        raise KernelResourcesError(
            f'{_library.too_many_rows(num_heads)} Got {B} samples.')
    return B, N, C, slots // slot_size


def _launch_config(dtype: torch.dtype, head_dims: int, slot_size: int,
                   overlap: int, device: torch.device) -> dict:
    """Block sizes, warps and precision of the kernels for ``device``.

    Only buckets of the per-resolution values reach the compiler: the
    slot size as its power-of-two tile (``BLOCK_S``: 64 for the 33-64
    slots of most resolutions) or, for 65-80 slots (65-67 at BOAT's
    cluster size, as at 800x1333), a 64-row tile and an ``EXTRA`` tile
    of 16 rows, which take about half the shared memory and products of
    one 128-row tile; the overlap as the tile of borrowed keys (``TAIL``: 32
    for the default 20). The values themselves are run-time arguments
    that Triton does not specialise on, so another resolution of the
    same bucket reuses the kernels.

    Args:
        dtype (torch.dtype): Of qkv.
        head_dims (int): ``d``.
        slot_size (int): ``S`` of the plan.
        overlap (int): Keys borrowed from the sibling.
        device (torch.device): Where the kernels run (the CPU means
            Triton's interpreter).

    Returns:
        dict: Constexprs and launch options.
    """
    fp64 = dtype == torch.float64
    wide = dtype in (torch.float32, torch.float64)
    if fp64 or (dtype == torch.float32
                and not torch.backends.cuda.matmul.allow_tf32):
        precision = 'ieee'
    else:
        precision = 'tf32'  # float32 under allow_tf32; ignored for 16 bits
    block_d = max(16, triton.next_power_of_2(head_dims))
    # The lent keys (at most the overlap) must lie in the first tile.
    extra = 16 if 64 < slot_size <= 80 and overlap <= 64 else 0
    block_s = 64 if extra else max(16, triton.next_power_of_2(slot_size))
    return dict(
        D=head_dims,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
        EXTRA=extra,
        TAIL=max(16, triton.next_power_of_2(max(1, min(overlap, slot_size)))),
        ACC=tl.float64 if fp64 else tl.float32,
        PRECISION=precision,
        # Triton 3.8's interpreter multiplies bfloat16 blocks as their raw
        # 16-bit patterns: there, products of bfloat16 run in float32.
        UPCAST=device.type == 'cpu' and dtype == torch.bfloat16,
        # A whole cluster's tiles stay in registers (sm_90, ptxas: no
        # spills; the registers are in docs/benchmarks.md): 8 warps, and
        # 16 for the backward of 32-bit and 64-bit inputs, whose tiles are
        # twice as large.
        fwd_warps=4 if block_s <= 32 else 8,
        bwd_warps=(16 if wide and block_s <= 64 else 8),
        # Two blocks of 8 warps per SM: ptxas fits the 16-bit backward of
        # 64-row tiles in 128 registers without spilling when told to.
        bwd_maxnreg=None if wide or extra or block_s > 64 else 128,
        # The second pass completes the lent keys with the first's part
        # (16-bit inputs: tensor-core products), else the kernel adds the
        # two passes' parts after them.
        LENT_IN_PASS=not wide)


def _split(scale: float, dtype: torch.dtype) -> Tuple[float, float]:
    """``scale`` as float32 ``hi + lo``: Triton passes Python floats as
    float32, and float64 inputs need the scale to float64 precision."""
    hi = float(np.float32(scale))
    if dtype != torch.float64:
        return hi, 0.
    return hi, float(np.float32(scale - hi))


@contextlib.contextmanager
def _resources(kernel: str, dtype: torch.dtype, cfg: dict):
    """Turn Triton's refusal to launch a kernel too large for the GPU into
    :class:`KernelResourcesError`, which says what to change."""
    try:
        yield
    except OutOfResources as e:
        if e.name != 'shared memory':
            raise
        raise _too_large(kernel, dtype, cfg, e.required, e.limit) from e


def _too_large(kernel: str, dtype: torch.dtype, cfg: dict, required: int,
               limit: int) -> KernelResourcesError:
    """The error of a ``'fwd'`` or ``'bwd'`` kernel that needs ``required``
    bytes of shared memory on a GPU that has ``limit``."""
    name = dict(fwd='forward', bwd='backward')[kernel]
    slots = cfg['BLOCK_S'] + cfg['EXTRA']
    # Autocast casts float32 only (16-bit tiles are already the least).
    fix = ('Run under bfloat16 or float16 autocast (16-bit tiles take half '
           'the memory), or run' if dtype == torch.float32 else 'Run')
    return KernelResourcesError(
        f"FSLA's Triton attention {name} needs {required} bytes of shared "
        f"memory per block for {dtype} clusters of up to {slots} "
        f"slots with heads {cfg['D']} wide; this GPU has {limit}. {fix} "
        f"the attention on tensor ops (fsla_cfg=dict("
        f"attention_impl='tensor'); impl='auto' does so by itself).")


def _compiled(kernel: str, dtype: torch.dtype, head_dims: int, slot_size: int,
              overlap: int, num_heads: int):
    """The ``'fwd'`` or ``'bwd'`` kernel for these sizes, compiled for the
    current GPU as the wrappers would launch it, but not launched (so not
    refused for its size)."""
    cfg = _launch_config(dtype, head_dims, slot_size, overlap,
                         torch.device('cuda'))
    return _warmup(kernel, dtype, cfg, slot_size, overlap, num_heads)


def _warmup(kernel: str, dtype: torch.dtype, cfg: dict, slot_size: int,
            overlap: int, num_heads: int):
    """:func:`_compiled` for the launch configuration ``cfg``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    C = cfg['D'] * num_heads
    # Per-N values are not specialised on: any stand-ins compile the same.
    sizes = (4 * slot_size, C, 4 * slot_size, slot_size, overlap, 4, 1., 0.)
    if kernel == 'fwd':
        # qkv, perm, valid, out, lse, image
        ptrs = (dtype, torch.int64, torch.uint8, dtype, _lse_dtype(dtype),
                dtype)
        fn, grid = _forward_kernel, (4, 1)
    else:
        # grad_out, grad_image, qkv, perm, valid, lse, grad, scratch
        ptrs = (dtype, dtype, dtype, torch.int64, torch.uint8,
                _lse_dtype(dtype), dtype, acc)
        fn, grid = _backward_kernel, (2, 1)
    return fn.warmup(
        *ptrs,
        *sizes,
        grid=grid,
        HAS_IMAGE=True,
        **_consts(cfg, num_heads, kernel))


def too_large_for_gpu(dtype: torch.dtype, head_dims: int, slot_size: int,
                      overlap: int, num_heads: int,
                      device_index: Optional[int],
                      backward: bool) -> Optional[KernelResourcesError]:
    """The error of the first kernel that a call needs and GPU
    ``device_index`` cannot launch for lack of shared memory, else None.

    Args:
        dtype (torch.dtype): Of qkv.
        head_dims (int): Channels per head.
        slot_size (int): Slots per cluster.
        overlap (int): Keys a cluster borrows from its sibling.
        num_heads (int): Heads.
        device_index (int, optional): The CUDA device (None: the current
            one).
        backward (bool): Whether the backward must fit too (a training
            step), or only the forward.

    Returns:
        KernelResourcesError | None: What to change, for the forward or
        the backward; None when the kernels asked for fit, in Triton's
        interpreter, or where Triton cannot tell (the launch then
        checks).
    """
    if interpreted():
        return None
    if device_index is None:
        # Triton's device queries take an int, not None.
        device_index = torch.cuda.current_device()
    for kernel in ('fwd', 'bwd') if backward else ('fwd', ):
        found = _kernel_too_large(kernel, dtype, head_dims, slot_size, overlap,
                                  num_heads, device_index)
        if found is not None:
            cfg = _launch_config(dtype, head_dims, slot_size, overlap,
                                 torch.device('cuda', device_index))
            return _too_large(kernel, dtype, cfg, *found)
    return None


def _kernel_too_large(kernel: str, dtype: torch.dtype, head_dims: int,
                      slot_size: int, overlap: int, num_heads: int,
                      device_index: int) -> Optional[Tuple[int, int]]:
    """``(required, limit)`` bytes of shared memory when the ``'fwd'`` or
    ``'bwd'`` kernel for these sizes needs more than GPU ``device_index``
    has, else None.

    Compiled for the GPU without launching, so that a call can be refused
    (or, under ``impl='auto'``, run on tensor ops) before it starts, and
    the forward of a training step can refuse a backward that could not
    run. None also where Triton cannot tell (its launch then checks).
    Decided once per launch configuration: TF32 on or off gives another
    kernel, and another answer.
    """
    cfg = _launch_config(dtype, head_dims, slot_size, overlap,
                         torch.device('cuda', device_index))
    return _fit_check(kernel, dtype, slot_size, overlap, num_heads,
                      device_index, tuple(sorted(cfg.items())))


@functools.lru_cache(maxsize=None)
def _fit_check(kernel: str, dtype: torch.dtype, slot_size: int, overlap: int,
               num_heads: int, device_index: int,
               config: tuple) -> Optional[Tuple[int, int]]:
    """:func:`_kernel_too_large` for the launch configuration ``config``
    (its items, sorted)."""
    try:
        from triton.compiler.compiler import max_shared_mem
        with torch.cuda.device(device_index):
            compiled = _warmup(kernel, dtype, dict(config), slot_size, overlap,
                               num_heads)
            required = int(compiled.metadata.shared)
            limit = int(max_shared_mem(device_index))
    except Exception as e:  # noqa: BLE001 (a Triton of other internals)
        # Not silent: without the check, impl='auto' cannot fall back
        # before a kernel too large for the GPU fails at its launch.
        warnings.warn(
            f"boat_mm could not check whether FSLA's Triton attention "
            f"fits this GPU's shared memory ({type(e).__name__}: {e}); a "
            f"kernel too large fails at its launch. Tell boat-mm's "
            f"maintainers the triton version ({triton.__version__}).")
        return None
    return (required, limit) if required > limit else None


def _consts(cfg: dict, num_heads: int, kernel: str) -> dict:
    """Constexprs and launch options of the ``'fwd'`` or ``'bwd'``
    kernel."""
    keys = ('D', 'BLOCK_D', 'BLOCK_S', 'EXTRA', 'TAIL', 'ACC', 'PRECISION',
            'UPCAST')
    consts = dict({k: cfg[k]
                   for k in keys},
                  HEADS=num_heads,
                  num_warps=cfg[kernel + '_warps'])
    if kernel == 'bwd':
        consts['LENT_IN_PASS'] = cfg['LENT_IN_PASS']
    if cfg.get(kernel + '_maxnreg'):
        consts['maxnreg'] = cfg[kernel + '_maxnreg']
    return consts


def clustered_attention_forward(
        qkv: Tensor, perm: Tensor, slot_valid: Tensor, num_heads: int,
        slot_size: int, overlap: int, scale: float,
        hw_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel of ``boat_mm::clustered_attention``.

    Same arguments and results as the op; the log-sum-exp is float32 for
    16-bit inputs, the value image is channels-last.

    Args:
        qkv (Tensor): ``(B, N, 3 * C)`` output of the qkv projection.
        perm (Tensor): ``(B * num_heads, slots)`` token of every slot.
        slot_valid (Tensor): ``(slots, )`` bool, real slots.
        num_heads (int): Number of heads.
        slot_size (int): Slots per cluster.
        overlap (int): Keys borrowed from the sibling cluster.
        scale (float): Logit scale.
        hw_shape (list[int]): ``[H, W]`` for the value image, or empty.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``(B, N, C)`` output, the
        ``(B, C, H, W)`` value image (empty without ``hw_shape``) and the
        ``(B * num_heads, slots)`` log-sum-exp of every query.
    """
    B, N, C, G = _check(qkv, perm, slot_valid, num_heads, slot_size, overlap)
    if len(hw_shape) and (len(hw_shape) != 2
                          or hw_shape[0] * hw_shape[1] != N):
        raise RuntimeError(
            f'hw_shape {list(hw_shape)} does not match N={N} tokens')
    cfg = _launch_config(qkv.dtype, C // num_heads, slot_size, overlap,
                         qkv.device)
    qkv, perm = qkv.contiguous(), perm.contiguous()
    out = qkv.new_empty(B, N, C)
    lse = qkv.new_empty(perm.shape, dtype=_lse_dtype(qkv.dtype))
    # Channels-last: a token's values are contiguous, as in qkv, so the
    # kernel writes them coalesced.
    image = (
        qkv.new_empty(B, *hw_shape, C).permute(0, 3, 1, 2)
        if len(hw_shape) else qkv.new_empty(0))
    # Inside the op, grad mode is off; an input that requires grad means a
    # backward may follow.
    if qkv.device.type == 'cuda' and qkv.requires_grad:
        too_large = _kernel_too_large('bwd', qkv.dtype, C // num_heads,
                                      slot_size, overlap, num_heads,
                                      qkv.device.index)
        if too_large is not None:
            raise _too_large('bwd', qkv.dtype, cfg, *too_large)
    with _resources('fwd', qkv.dtype, cfg):
        _forward_kernel[(G, B * num_heads)](
            qkv,
            perm,
            slot_valid.view(torch.uint8),
            out,
            lse,
            image if len(hw_shape) else out,
            N,
            C,
            perm.shape[1],
            slot_size,
            overlap,
            G,
            *_split(scale, qkv.dtype),
            HAS_IMAGE=bool(len(hw_shape)),
            **_consts(cfg, num_heads, 'fwd'))
    return out, image, lse


def clustered_attention_backward(grad_out: Tensor, grad_image: Tensor,
                                 qkv: Tensor, perm: Tensor, slot_valid: Tensor,
                                 lse: Tensor, num_heads: int, slot_size: int,
                                 overlap: int, scale: float) -> Tensor:
    """The Triton kernels of ``boat_mm::clustered_attention_backward``.

    Args:
        grad_out (Tensor): ``(B, N, C)`` gradient of the output.
        grad_image (Tensor): ``(B, C, H, W)`` gradient of the value image,
            or empty.
        qkv (Tensor): ``(B, N, 3 * C)`` the forward's input.
        perm (Tensor): ``(B * num_heads, slots)`` token of every slot.
        slot_valid (Tensor): ``(slots, )`` bool, real slots.
        lse (Tensor): The forward's log-sum-exp.
        num_heads (int): Number of heads.
        slot_size (int): Slots per cluster.
        overlap (int): Keys borrowed from the sibling cluster.
        scale (float): Logit scale.

    Returns:
        Tensor: ``(B, N, 3 * C)`` gradient of ``qkv``.
    """
    B, N, C, G = _check(qkv, perm, slot_valid, num_heads, slot_size, overlap)
    if tuple(grad_out.shape) != (B, N, C):
        raise RuntimeError(f'grad_out must have shape {(B, N, C)}, got '
                           f'{tuple(grad_out.shape)}')
    if lse.shape != perm.shape:
        raise RuntimeError(f'lse must have shape {tuple(perm.shape)}, got '
                           f'{tuple(lse.shape)}')
    has_image = grad_image.numel() > 0
    if has_image and grad_image.numel() != B * C * N:
        raise RuntimeError(f'grad_image must hold (B, C, H, W) = '
                           f'{B * C * N} values, got '
                           f'{tuple(grad_image.shape)}')
    cfg = _launch_config(qkv.dtype, C // num_heads, slot_size, overlap,
                         qkv.device)
    qkv, perm = qkv.contiguous(), perm.contiguous()
    grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    if has_image:
        # Read as channels-last (coalesced); a no-op for the forward's
        # layout.
        grad_image = grad_image.contiguous(memory_format=torch.channels_last)
    else:
        grad_image = grad_out
    # One program per sibling pair writes every gradient row of its
    # tokens once: deterministic, no atomics. What its first cluster's
    # queries leave for the second's (four TAIL-row tiles) goes through a
    # scratch that only this program writes and reads.
    grad = torch.empty_like(qkv)
    M, P = B * num_heads, (G + 1) // 2
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    tiles = 4 if cfg['LENT_IN_PASS'] else 6
    scratch = qkv.new_empty(M * P * tiles * cfg['TAIL'] * cfg['D'], dtype=acc)
    with _resources('bwd', qkv.dtype, cfg):
        _backward_kernel[(P,
                          M)](grad_out,
                              grad_image,
                              qkv,
                              perm,
                              slot_valid.view(torch.uint8),
                              lse,
                              grad,
                              scratch,
                              N,
                              C,
                              perm.shape[1],
                              slot_size,
                              overlap,
                              G,
                              *_split(scale, qkv.dtype),
                              HAS_IMAGE=has_image,
                              **_consts(cfg, num_heads, 'bwd'))
    return grad
