# Copyright (c) boat-mm contributors. All rights reserved.
"""Triton kernels of ``boat_mm::clustered_attention`` and its backward.

They compute what the C++ CPU op (``boat_mm/ops/csrc/
clustered_attention.cpp``) computes, FlashAttention-style, on the GPU (or
on CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``, which the
tests use):

- One program per ``(cluster, sample * head)``: grid ``(G, B * h)``, fixed
  by the plan, so launches need no host-device synchronisation and CUDA
  graphs can capture them. The real-token count of a cluster is read on
  the device from ``slot_valid`` (real slots first, as in every
  :class:`~boat_mm.ops.ClusterPlan`).
- A program loads the q, k and v rows of its tokens straight from the
  ``(B, N, 3C)`` qkv through ``perm`` (no permuted copies) into one tile
  of ``BLOCK_S`` rows (its queries and its own keys), and the keys it
  borrows from its sibling (the first ``overlap`` of cluster ``2j+1`` for
  ``2j``, the last ones of ``2j`` for ``2j+1``) into a tail tile of
  ``TAIL`` rows sized to the overlap, so that few masked-out products
  run; softmax in float32 (float64 for float64 inputs). It writes the
  outputs to their raster rows, the log-sum-exp per slot and, with an
  image shape, the values of its tokens as the channels-last
  ``(B, C, H, W)`` image of FSLA's local term (a token's channels are
  contiguous: coalesced stores).
- The backward recomputes the probabilities from the log-sum-exp. As a
  program holds every key of its queries, one kernel computes
  ``D_i = sum_j P_ij dP_ij`` and the query, key and value gradients in
  one pass (five products per query and key); the k and v gradients of
  the keys its sibling borrows are completed by a second, small kernel
  from the two programs' partial sums. Every row of the qkv gradient is
  written once, by one program: deterministic, no atomics.
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
from typing import List, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

# float32 for 16-bit inputs (their rounding would spoil the recomputed
# probabilities), else the input dtype: what the fake kernel says.
from .._library import _lse_dtype

__all__ = [
    'clustered_attention_forward', 'clustered_attention_backward',
    'interpreted'
]


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (decided by
    ``TRITON_INTERPRET`` when this module was imported)."""
    return not isinstance(_forward_kernel, triton.runtime.JITFunction)


@triton.jit
def _cluster(qkv, perm, valid, N, C, perm_stride, S, HEADS: tl.constexpr,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """What every kernel first reads of its program's cluster ``c`` and
    its sibling: real-token counts, the raster tokens of ``c``'s ``S``
    slots (in a ``BLOCK``-row tile), and the qkv pointer of the program's
    sample and head."""
    c = tl.program_id(0)
    m = tl.program_id(1)
    b = (m // HEADS).to(tl.int64)
    head = m % HEADS
    sib = c ^ 1
    offs = tl.arange(0, BLOCK)
    in_slots = offs < S
    # Real tokens come first in a cluster's slots: count them.
    n_own = tl.sum(
        tl.load(valid + c * S + offs, mask=in_slots, other=0).to(tl.int32))
    n_sib = tl.sum(
        tl.load(valid + sib * S + offs, mask=in_slots, other=0).to(tl.int32))
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


@triton.jit(do_not_specialize=['N', 'perm_stride', 'S', 'overlap'])
def _forward_kernel(qkv, perm, valid, out, lse, image, N, C, perm_stride, S,
                    overlap, scale, scale_lo, HEADS: tl.constexpr,
                    D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr, TAIL: tl.constexpr,
                    HAS_IMAGE: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    (c, m, b, head, sib, offs, in_slots, n_own, n_sib, row, real, tok, offs_d,
     d_ok, base) = _cluster(qkv, perm, valid, N, C, perm_stride, S, HEADS, D,
                            BLOCK_D, BLOCK_S)
    mask = real[:, None] & d_ok[None, :]
    # The cluster's own tokens are its queries and its first keys.
    q = _rows(base, tok, mask, offs_d, C, 0, UPCAST)
    k = _rows(base, tok, mask, offs_d, C, 1, UPCAST)
    v = _rows(base, tok, mask, offs_d, C, 2, UPCAST)
    t_tok, t_ok = _borrowed(perm, row, c, sib, S, n_sib, overlap, TAIL)
    t_mask = t_ok[:, None] & d_ok[None, :]
    kt = _rows(base, t_tok, t_mask, offs_d, C, 1, UPCAST)
    vt = _rows(base, t_tok, t_mask, offs_d, C, 2, UPCAST)

    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    s = tl.where(real[None, :], s * scale + s * scale_lo, float('-inf'))
    st = tl.dot(q, tl.trans(kt), input_precision=PRECISION, out_dtype=ACC)
    st = tl.where(t_ok[None, :], st * scale + st * scale_lo, float('-inf'))
    m_i = tl.maximum(tl.max(s, 1), tl.max(st, 1))
    p = tl.exp(s - m_i[:, None])
    pt = tl.exp(st - m_i[:, None])
    l_i = tl.sum(p, 1) + tl.sum(pt, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
    acc += tl.dot(
        pt.to(vt.dtype), vt, input_precision=PRECISION, out_dtype=ACC)
    o = acc / l_i[:, None]
    # out (B, N, C) and the channels-last value image share the layout.
    rows = (b * N + tok[:, None]) * C + head * D + offs_d[None, :]
    tl.store(out + rows, o.to(out.dtype.element_ty), mask=mask)
    if HAS_IMAGE:
        tl.store(image + rows, v.to(image.dtype.element_ty), mask=mask)
    # Padding slots get 0, as in the CPU op.
    lse_val = tl.where(real, m_i + tl.log(l_i), 0.)
    tl.store(
        lse + row + c * S + offs,
        lse_val.to(lse.dtype.element_ty),
        mask=in_slots)


@triton.jit(do_not_specialize=['N', 'perm_stride', 'S', 'overlap', 'G'])
def _backward_kernel(grad_out, grad_image, qkv, perm, valid, lse, grad, part,
                     N, C, perm_stride, S, overlap, G, scale, scale_lo,
                     HEADS: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                     TAIL: tl.constexpr, HAS_IMAGE: tl.constexpr,
                     ACC: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
    (c, m, b, head, sib, offs, in_slots, n_own, n_sib, row, real, tok, offs_d,
     d_ok, base) = _cluster(qkv, perm, valid, N, C, perm_stride, S, HEADS, D,
                            BLOCK_D, BLOCK_S)
    mask = real[:, None] & d_ok[None, :]
    q = _rows(base, tok, mask, offs_d, C, 0, UPCAST)
    k = _rows(base, tok, mask, offs_d, C, 1, UPCAST)
    v = _rows(base, tok, mask, offs_d, C, 2, UPCAST)
    t_tok, t_ok = _borrowed(perm, row, c, sib, S, n_sib, overlap, TAIL)
    t_mask = t_ok[:, None] & d_ok[None, :]
    kt = _rows(base, t_tok, t_mask, offs_d, C, 1, UPCAST)
    vt = _rows(base, t_tok, t_mask, offs_d, C, 2, UPCAST)
    # Pointer tiles are rebuilt where used (fewer live registers).
    out_row = (b * N + tok) * C + head * D
    do = tl.load(
        grad_out + out_row[:, None] + offs_d[None, :], mask=mask,
        other=0.).to(q.dtype)
    lse_i = tl.load(lse + row + c * S + offs, mask=real, other=0.).to(ACC)

    # Every key of the cluster's queries is in this program: the
    # probabilities, D_i = sum_j P_ij dP_ij and dS in one pass (five
    # products per query and key).
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    p = tl.where(real[None, :],
                 tl.exp(s * scale + s * scale_lo - lse_i[:, None]), 0.)
    st = tl.dot(q, tl.trans(kt), input_precision=PRECISION, out_dtype=ACC)
    pt = tl.where(t_ok[None, :],
                  tl.exp(st * scale + st * scale_lo - lse_i[:, None]), 0.)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
    dpt = tl.dot(do, tl.trans(vt), input_precision=PRECISION, out_dtype=ACC)
    delta = tl.sum(p * dp, 1) + tl.sum(pt * dpt, 1)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dst = (pt * (dpt - delta[:, None])).to(q.dtype)
    # The products below take P in the input dtype: the float32 tiles can
    # go now.
    p, pt = p.to(do.dtype), pt.to(do.dtype)
    dq = tl.dot(ds, k, input_precision=PRECISION, out_dtype=ACC)
    dq += tl.dot(dst, kt, input_precision=PRECISION, out_dtype=ACC)
    g_row = (b * N + tok) * (3 * C) + head * D
    ty = grad.dtype.element_ty
    tl.store(
        grad + g_row[:, None] + offs_d[None, :],
        (dq * scale + dq * scale_lo).to(ty),
        mask=mask)

    # Own keys: from the own queries here; those the sibling borrows get
    # the rest from the sibling's program (summed by _lent_keys_kernel).
    dv = tl.dot(tl.trans(p), do, input_precision=PRECISION, out_dtype=ACC)
    dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION, out_dtype=ACC)
    dk = dk * scale + dk * scale_lo
    if HAS_IMAGE:
        dv += tl.load(
            grad_image + out_row[:, None] + offs_d[None, :],
            mask=mask,
            other=0.).to(ACC)
    n_lent = tl.minimum(n_own, overlap)
    lent_first = tl.where(c % 2 == 0, n_own - n_lent, 0)
    lent = real & (offs >= lent_first) & (offs < lent_first + n_lent)
    done = mask & ~lent[:, None]
    g_at = grad + g_row[:, None] + offs_d[None, :]
    tl.store(g_at + C, dk.to(ty), mask=done)
    tl.store(g_at + 2 * C, dv.to(ty), mask=done)
    # Partial sums (ACC) of lent keys, [kind, m, c, j, D]: 0/1 dk/dv of
    # the own queries, 2/3 of this cluster's queries for its borrowed keys.
    M = tl.num_programs(1)
    j = (offs - lent_first).to(tl.int64)
    cell = ((m.to(tl.int64) * G + c) * TAIL) * D
    kind = M.to(tl.int64) * G * TAIL * D
    lent_at = part + cell + j[:, None] * D + offs_d[None, :]
    lent_mask = lent[:, None] & d_ok[None, :]
    tl.store(lent_at, dk, mask=lent_mask)
    tl.store(lent_at + kind, dv, mask=lent_mask)
    dvt = tl.dot(tl.trans(pt), do, input_precision=PRECISION, out_dtype=ACC)
    dkt = tl.dot(tl.trans(dst), q, input_precision=PRECISION, out_dtype=ACC)
    dkt = dkt * scale + dkt * scale_lo
    jt = tl.arange(0, TAIL)
    borrow_at = part + 2 * kind + cell + jt[:, None] * D + offs_d[None, :]
    tl.store(borrow_at, dkt, mask=t_mask)
    tl.store(borrow_at + kind, dvt, mask=t_mask)


@triton.jit(do_not_specialize=['N', 'perm_stride', 'S', 'overlap', 'G'])
def _lent_keys_kernel(qkv, perm, valid, grad, part, N, C, perm_stride, S,
                      overlap, G, HEADS: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                      TAIL: tl.constexpr):
    """The k and v gradients of the keys a cluster lends: its own
    queries' part plus its sibling's."""
    c = tl.program_id(0)
    m = tl.program_id(1)
    b = (m // HEADS).to(tl.int64)
    head = m % HEADS
    sib = c ^ 1
    offs = tl.arange(0, BLOCK_S)
    n_own = tl.sum(
        tl.load(valid + c * S + offs, mask=offs < S, other=0).to(tl.int32))
    n_lent = tl.minimum(n_own, overlap)
    lent_first = tl.where(c % 2 == 0, n_own - n_lent, 0)
    j = tl.arange(0, TAIL)
    ok = j < n_lent
    row = m.to(tl.int64) * perm_stride
    tok = tl.load(perm + row + c * S + lent_first + j, mask=ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < D)[None, :]
    kind = tl.num_programs(1).to(tl.int64) * G * TAIL * D
    at = j[:, None] * D + offs_d[None, :]
    own = part + ((m.to(tl.int64) * G + c) * TAIL) * D + at
    other = part + 2 * kind + ((m.to(tl.int64) * G + sib) * TAIL) * D + at
    dk = tl.load(
        own, mask=mask, other=0.) + tl.load(
            other, mask=mask, other=0.)
    dv = tl.load(
        own + kind, mask=mask, other=0.) + tl.load(
            other + kind, mask=mask, other=0.)
    dst = grad + (b * N + tok[:, None]) * (3 * C) + head * D + offs_d[None, :]
    ty = grad.dtype.element_ty
    tl.store(dst + C, dk.to(ty), mask=mask)
    tl.store(dst + 2 * C, dv.to(ty), mask=mask)


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
    if slots == 0 or slots % (2 * slot_size):
        raise RuntimeError(f'slot_valid must cover whole sibling pairs of '
                           f'2 * {slot_size} slots, got {slots}')
    if (perm.dim() != 2 or perm.dtype != torch.long
            or perm.shape[0] != B * num_heads or perm.shape[1] < slots):
        raise RuntimeError(
            f'perm must be int64 of shape (B * num_heads, >= {slots}) = '
            f'({B * num_heads}, {slots}), got {tuple(perm.shape)} '
            f'{perm.dtype}')
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
    return B, N, C, slots // slot_size


def _launch_config(dtype: torch.dtype, head_dims: int, slot_size: int,
                   overlap: int, device: torch.device) -> dict:
    """Block sizes, warps and precision of the kernels for ``device``.

    Only buckets of the per-resolution values reach the compiler: the
    slot size as its power-of-two tile (``BLOCK_S``: 64 for the 33-64
    slots of most resolutions, 128 for 65-67), the overlap as the tile of
    borrowed keys (``TAIL``: 32 for the default 20); the values
    themselves are run-time arguments that Triton does not specialise
    on, so another resolution of the same bucket reuses the kernels.

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
    if fp64 or (dtype == torch.float32
                and not torch.backends.cuda.matmul.allow_tf32):
        precision = 'ieee'
    else:
        precision = 'tf32'  # float32 under allow_tf32; ignored for 16 bits
    block_d = max(16, triton.next_power_of_2(head_dims))
    block_s = max(16, triton.next_power_of_2(slot_size))
    return dict(
        D=head_dims,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
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
        bwd_warps=(16 if dtype in (torch.float32, torch.float64)
                   and block_s <= 64 else 8))


def _split(scale: float, dtype: torch.dtype) -> Tuple[float, float]:
    """``scale`` as float32 ``hi + lo``: Triton passes Python floats as
    float32, and float64 inputs need the scale to float64 precision."""
    hi = float(np.float32(scale))
    if dtype != torch.float64:
        return hi, 0.
    return hi, float(np.float32(scale - hi))


def _device_guard(t: Tensor):
    """Launch on the tensor's GPU (Triton launches on the current one)."""
    if t.device.type == 'cuda':
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _consts(cfg: dict, num_heads: int, warps: str) -> dict:
    keys = ('D', 'BLOCK_D', 'BLOCK_S', 'TAIL', 'ACC', 'PRECISION', 'UPCAST')
    return dict({k: cfg[k]
                 for k in keys},
                HEADS=num_heads,
                num_warps=cfg[warps])


def clustered_attention_forward(
        qkv: Tensor, perm: Tensor, slot_valid: Tensor, num_heads: int,
        slot_size: int, overlap: int, scale: float,
        hw_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel of ``boat_mm::clustered_attention`` (same
    arguments and results; the log-sum-exp is float32 for 16-bit inputs,
    the value image is channels-last)."""
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
    if perm.shape[1] > G * slot_size:
        lse[:, G * slot_size:].zero_()  # slots past the pairs: unused
    # Channels-last: a token's values are contiguous, as in qkv, so the
    # kernel writes them coalesced.
    image = (
        qkv.new_empty(B, *hw_shape, C).permute(0, 3, 1, 2)
        if len(hw_shape) else qkv.new_empty(0))
    with _device_guard(qkv):
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
            *_split(scale, qkv.dtype),
            HAS_IMAGE=bool(len(hw_shape)),
            **_consts(cfg, num_heads, 'fwd_warps'))
    return out, image, lse


def clustered_attention_backward(grad_out: Tensor, grad_image: Tensor,
                                 qkv: Tensor, perm: Tensor, slot_valid: Tensor,
                                 lse: Tensor, num_heads: int, slot_size: int,
                                 overlap: int, scale: float) -> Tensor:
    """The Triton kernels of ``boat_mm::clustered_attention_backward``."""
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
    d = C // num_heads
    cfg = _launch_config(qkv.dtype, d, slot_size, overlap, qkv.device)
    qkv, perm = qkv.contiguous(), perm.contiguous()
    grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    if has_image:
        # Read as channels-last (coalesced); a no-op for the forward's
        # layout.
        grad_image = grad_image.contiguous(memory_format=torch.channels_last)
    else:
        grad_image = grad_out
    # Every row is written once: a token's q gradient and the k and v
    # gradients of keys no sibling borrows by its cluster's program, those
    # of lent keys by the second kernel from two partial sums.
    grad = torch.empty_like(qkv)
    M = B * num_heads
    part = torch.empty(
        4 * M * G * cfg['TAIL'] * d,
        dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32,
        device=qkv.device)
    valid = slot_valid.view(torch.uint8)
    consts = _consts(cfg, num_heads, 'bwd_warps')
    sizes = (N, C, perm.shape[1], slot_size, overlap, G)
    with _device_guard(qkv):
        _backward_kernel[(G,
                          M)](grad_out,
                              grad_image,
                              qkv,
                              perm,
                              valid,
                              lse,
                              grad,
                              part,
                              *sizes,
                              *_split(scale, qkv.dtype),
                              HAS_IMAGE=has_image,
                              **consts)
        if overlap:
            _lent_keys_kernel[(G,
                               M)](qkv,
                                   perm,
                                   valid,
                                   grad,
                                   part,
                                   *sizes,
                                   HEADS=num_heads,
                                   D=d,
                                   BLOCK_D=cfg['BLOCK_D'],
                                   BLOCK_S=cfg['BLOCK_S'],
                                   TAIL=cfg['TAIL'])
    return grad
