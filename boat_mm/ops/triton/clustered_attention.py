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
  ``(B, N, 3C)`` qkv through ``perm`` (no permuted copies), runs its
  cluster's queries against exactly its own keys plus the ``overlap``
  borrowed from its sibling (the first ones of cluster ``2j+1`` for
  ``2j``, the last ones of ``2j`` for ``2j+1``) in tiles of ``BLOCK_K``
  keys with an online softmax accumulated in float32 (float64 for float64
  inputs), writes the outputs to their raster rows and saves the
  log-sum-exp per slot. With an image shape it also writes the values of
  its own tokens as the ``(B, C, H, W)`` image of FSLA's local term.
- The backward recomputes the probabilities from the log-sum-exp. A first
  kernel, per cluster, computes ``D_i = sum_j P_ij dP_ij`` and the query
  gradients; a second, per cluster, the key and value gradients of its own
  tokens from its own queries and from its sibling's queries (for the keys
  the sibling borrows), plus the image gradient. Every row of the qkv
  gradient is written once, by one program: deterministic, no atomics.

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
def _cluster(qkv, perm, valid, N, C, perm_stride, HEADS: tl.constexpr,
             D: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
             BLOCK: tl.constexpr):
    """What every kernel first reads of its program's cluster ``c`` and
    its sibling: real-token counts, the raster tokens of ``c``'s ``BLOCK``
    slots, and the qkv pointer of the program's sample and head."""
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
    return (c, b, head, sib, offs, in_slots, n_own, n_sib, row, real, tok,
            offs_d, d_ok, base)


@triton.jit
def _key_range(c, sib, n_own, n_sib, overlap, S: tl.constexpr):
    """First sibling slot and count of the keys of cluster ``c``'s
    queries: its own, then the ``overlap`` borrowed from its sibling."""
    n_borrow = tl.minimum(n_sib, overlap)
    # Cluster 2j borrows the first keys of 2j+1, 2j+1 the last ones of 2j.
    sib_first = sib * S + tl.where(c % 2 == 0, 0, n_sib - n_borrow)
    return sib_first, n_own + n_borrow


@triton.jit
def _load_queries(base, tok, mask, offs_d, C, UPCAST: tl.constexpr):
    """The query rows of raster tokens ``tok`` (float32 under
    ``UPCAST``)."""
    q = tl.load(
        base + tok[:, None] * (3 * C) + offs_d[None, :], mask=mask, other=0.)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _forward_kernel(qkv, perm, valid, out, lse, image, N, C, perm_stride,
                    overlap, scale, scale_lo, HEADS: tl.constexpr,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_IMAGE: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    (c, b, head, sib, offs, in_slots, n_own, n_sib, row, q_real, q_tok, offs_d,
     d_ok, base) = _cluster(qkv, perm, valid, N, C, perm_stride, HEADS, D,
                            BLOCK_D, S, BLOCK_Q)
    sib_first, n_keys = _key_range(c, sib, n_own, n_sib, overlap, S)
    q = _load_queries(base, q_tok, q_real[:, None] & d_ok[None, :], offs_d, C,
                      UPCAST)

    m_i = tl.full((BLOCK_Q, ), float('-inf'), ACC)
    l_i = tl.zeros((BLOCK_Q, ), ACC)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), ACC)
    for start in range(0, n_keys, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        k_ok = j < n_keys
        own = j < n_own
        slot = tl.where(own, c * S + j, sib_first + j - n_own)
        k_tok = tl.load(perm + row + slot, mask=k_ok, other=0)
        kv = base + k_tok[:, None] * (3 * C) + offs_d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kv + C, mask=kv_mask, other=0.)
        v = tl.load(kv + 2 * C, mask=kv_mask, other=0.)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        s = s * scale + s * scale_lo
        s = tl.where(k_ok[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
        if HAS_IMAGE:
            # The value image: every token is its own cluster's key once.
            img = image + b * C * N + (head * D + offs_d[None, :]) * N
            tl.store(
                img + k_tok[:, None],
                v,
                mask=(own & k_ok)[:, None] & d_ok[None, :])

    o = acc / l_i[:, None]
    dst = out + (b * N + q_tok[:, None]) * C + head * D + offs_d[None, :]
    tl.store(
        dst, o.to(out.dtype.element_ty), mask=q_real[:, None] & d_ok[None, :])
    # Padding slots get 0, as in the CPU op.
    lse_val = tl.where(q_real, m_i + tl.log(l_i), 0.)
    tl.store(
        lse + row + c * S + offs,
        lse_val.to(lse.dtype.element_ty),
        mask=in_slots)


@triton.jit
def _backward_query_kernel(grad_out, qkv, perm, valid, lse, delta, grad, N, C,
                           perm_stride, overlap, scale, scale_lo,
                           HEADS: tl.constexpr, D: tl.constexpr,
                           BLOCK_D: tl.constexpr, S: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                           ACC: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr):
    (c, b, head, sib, offs, in_slots, n_own, n_sib, row, q_real, q_tok, offs_d,
     d_ok, base) = _cluster(qkv, perm, valid, N, C, perm_stride, HEADS, D,
                            BLOCK_D, S, BLOCK_Q)
    sib_first, n_keys = _key_range(c, sib, n_own, n_sib, overlap, S)
    q_mask = q_real[:, None] & d_ok[None, :]
    q = _load_queries(base, q_tok, q_mask, offs_d, C, UPCAST)
    do = tl.load(
        grad_out + (b * N + q_tok[:, None]) * C + head * D + offs_d[None, :],
        mask=q_mask,
        other=0.)
    do = do.to(q.dtype)
    lse_i = tl.load(lse + row + c * S + offs, mask=q_real, other=0.).to(ACC)

    # D_i = sum_j P_ij dP_ij first (it needs whole rows), then dS and dQ.
    delta_i = tl.zeros((BLOCK_Q, ), ACC)
    for start in range(0, n_keys, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        k_ok = j < n_keys
        own = j < n_own
        slot = tl.where(own, c * S + j, sib_first + j - n_own)
        k_tok = tl.load(perm + row + slot, mask=k_ok, other=0)
        kv = base + k_tok[:, None] * (3 * C) + offs_d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kv + C, mask=kv_mask, other=0.)
        v = tl.load(kv + 2 * C, mask=kv_mask, other=0.)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        s = s * scale + s * scale_lo
        p = tl.where(k_ok[None, :], tl.exp(s - lse_i[:, None]), 0.)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        delta_i += tl.sum(p * dp, 1)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), ACC)
    for start in range(0, n_keys, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        k_ok = j < n_keys
        own = j < n_own
        slot = tl.where(own, c * S + j, sib_first + j - n_own)
        k_tok = tl.load(perm + row + slot, mask=k_ok, other=0)
        kv = base + k_tok[:, None] * (3 * C) + offs_d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kv + C, mask=kv_mask, other=0.)
        v = tl.load(kv + 2 * C, mask=kv_mask, other=0.)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        s = s * scale + s * scale_lo
        p = tl.where(k_ok[None, :], tl.exp(s - lse_i[:, None]), 0.)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta_i[:, None])
        dq += tl.dot(
            ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    dst = (
        grad + (b * N + q_tok[:, None]) * (3 * C) + head * D + offs_d[None, :])
    tl.store(
        dst, (dq * scale + dq * scale_lo).to(grad.dtype.element_ty),
        mask=q_mask)
    tl.store(delta + row + c * S + offs, delta_i, mask=q_real)


@triton.jit
def _backward_key_kernel(grad_out, grad_image, qkv, perm, valid, lse, delta,
                         grad, N, C, perm_stride, overlap, scale, scale_lo,
                         HEADS: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, S: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
                         HAS_IMAGE: tl.constexpr, ACC: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    (c, b, head, sib, offs, in_slots, n_own, n_sib, row, k_real, k_tok, offs_d,
     d_ok, base) = _cluster(qkv, perm, valid, N, C, perm_stride, HEADS, D,
                            BLOCK_D, S, BLOCK_S)
    # The keys of this cluster that its sibling borrows: the last ones of
    # 2j (seen by 2j+1), the first ones of 2j+1 (seen by 2j).
    n_lent = tl.minimum(n_own, overlap)
    lent_first = tl.where(c % 2 == 0, n_own - n_lent, 0)
    k_mask = k_real[:, None] & d_ok[None, :]
    C3 = 3 * C
    kv = base + k_tok[:, None] * C3 + offs_d[None, :]
    k = tl.load(kv + C, mask=k_mask, other=0.)
    v = tl.load(kv + 2 * C, mask=k_mask, other=0.)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    lent = k_real & (offs >= lent_first) & (offs < lent_first + n_lent)

    dk = tl.zeros((BLOCK_S, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_S, BLOCK_D), ACC)
    for src in tl.static_range(2):
        # Queries of the cluster itself (all its keys), then of its
        # sibling (only the lent keys; none without overlap).
        if src == 0:
            qc = c
            n_q = n_own
            allowed = k_real
        else:
            qc = sib
            n_q = tl.where(n_lent > 0, n_sib, 0)
            allowed = lent
        for start in range(0, n_q, BLOCK_Q):
            i = start + tl.arange(0, BLOCK_Q)
            q_ok = i < n_q
            q_tok = tl.load(perm + row + qc * S + i, mask=q_ok, other=0)
            q_mask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(
                base + q_tok[:, None] * C3 + offs_d[None, :],
                mask=q_mask,
                other=0.)
            if UPCAST:
                q = q.to(tl.float32)
            do = tl.load(
                grad_out + (b * N + q_tok[:, None]) * C + head * D +
                offs_d[None, :],
                mask=q_mask,
                other=0.)
            do = do.to(q.dtype)
            lse_i = tl.load(
                lse + row + qc * S + i, mask=q_ok, other=0.).to(ACC)
            delta_i = tl.load(delta + row + qc * S + i, mask=q_ok, other=0.)
            # Transposed scores: (keys, queries).
            st = tl.dot(
                k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)
            st = st * scale + st * scale_lo
            pt = tl.where(allowed[:, None] & q_ok[None, :],
                          tl.exp(st - lse_i[None, :]), 0.)
            dv += tl.dot(
                pt.to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)
            dpt = tl.dot(
                v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
            dst = pt * (dpt - delta_i[None, :])
            dk += tl.dot(
                dst.to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)
    if HAS_IMAGE:
        img = grad_image + b * C * N + (head * D + offs_d[None, :]) * N
        dv += tl.load(img + k_tok[:, None], mask=k_mask, other=0.).to(ACC)
    dst = grad + (b * N + k_tok[:, None]) * C3 + head * D + offs_d[None, :]
    tl.store(
        dst + C, (dk * scale + dk * scale_lo).to(grad.dtype.element_ty),
        mask=k_mask)
    tl.store(dst + 2 * C, dv.to(grad.dtype.element_ty), mask=k_mask)


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
    return B, N, C, slots // slot_size


def _launch_config(qkv: Tensor, head_dims: int, slot_size: int) -> dict:
    """Block sizes and precision shared by the three kernels."""
    if qkv.device.type == 'cpu' and not interpreted():
        raise RuntimeError(
            'The Triton kernels got CPU tensors but were compiled for the '
            'GPU: set TRITON_INTERPRET=1 before the first Triton call of '
            "the process to run them in Triton's interpreter, or use "
            "impl='cpp' or 'tensor' on the CPU.")
    fp64 = qkv.dtype == torch.float64
    if fp64 or (qkv.dtype == torch.float32
                and not torch.backends.cuda.matmul.allow_tf32):
        precision = 'ieee'
    else:
        precision = 'tf32'  # float32 under allow_tf32; ignored for 16 bits
    block_d = max(16, triton.next_power_of_2(head_dims))
    return dict(
        D=head_dims,
        BLOCK_D=block_d,
        S=slot_size,
        ACC=tl.float64 if fp64 else tl.float32,
        PRECISION=precision,
        # Triton 3.8's interpreter multiplies bfloat16 blocks as their raw
        # 16-bit patterns: there, products of bfloat16 run in float32.
        UPCAST=interpreted() and qkv.dtype == torch.bfloat16,
        # Tiles that stay in registers on an H100 (ptxas reports no
        # spills for 32-wide heads): tensor-core products take 64 keys a
        # tile (32 for wide heads) with 4 warps; IEEE float32 and float64
        # products (FMA) take 16 with 8 warps.
        block_k=(16 if precision == 'ieee' else 32 if block_d > 64 else 64),
        num_warps=8 if precision == 'ieee' else 4,
        block_s=max(16, triton.next_power_of_2(slot_size)))


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


def clustered_attention_forward(
        qkv: Tensor, perm: Tensor, slot_valid: Tensor, num_heads: int,
        slot_size: int, overlap: int, scale: float,
        hw_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel of ``boat_mm::clustered_attention`` (same
    arguments and results; the log-sum-exp is float32 for 16-bit
    inputs)."""
    B, N, C, G = _check(qkv, perm, slot_valid, num_heads, slot_size, overlap)
    if len(hw_shape) and (len(hw_shape) != 2
                          or hw_shape[0] * hw_shape[1] != N):
        raise RuntimeError(
            f'hw_shape {list(hw_shape)} does not match N={N} tokens')
    d = C // num_heads
    cfg = _launch_config(qkv, d, slot_size)
    qkv, perm = qkv.contiguous(), perm.contiguous()
    out = qkv.new_empty(B, N, C)
    lse = qkv.new_empty(perm.shape, dtype=_lse_dtype(qkv.dtype))
    if perm.shape[1] > G * slot_size:
        lse[:, G * slot_size:].zero_()  # slots past the pairs: unused
    image = (
        qkv.new_empty(B, C, *hw_shape) if len(hw_shape) else qkv.new_empty(0))
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
            overlap,
            *_split(scale, qkv.dtype),
            HEADS=num_heads,
            D=d,
            BLOCK_D=cfg['BLOCK_D'],
            S=slot_size,
            BLOCK_Q=cfg['block_s'],
            BLOCK_K=cfg['block_k'],
            HAS_IMAGE=bool(len(hw_shape)),
            ACC=cfg['ACC'],
            PRECISION=cfg['PRECISION'],
            UPCAST=cfg['UPCAST'],
            num_warps=cfg['num_warps'])
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
    cfg = _launch_config(qkv, d, slot_size)
    qkv, perm = qkv.contiguous(), perm.contiguous()
    grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    grad_image = grad_image.contiguous() if has_image else grad_out
    # Every row is written once: each token is a real slot exactly once per
    # (sample, head); its q gradient comes from the first kernel, its k
    # and v gradients from the second.
    grad = torch.empty_like(qkv)
    delta = torch.empty(perm.shape, dtype=lse.dtype, device=qkv.device)
    valid = slot_valid.view(torch.uint8)
    common = dict(
        HEADS=num_heads,
        D=d,
        BLOCK_D=cfg['BLOCK_D'],
        S=slot_size,
        ACC=cfg['ACC'],
        PRECISION=cfg['PRECISION'],
        UPCAST=cfg['UPCAST'],
        num_warps=cfg['num_warps'])
    grid = (G, B * num_heads)
    with _device_guard(qkv):
        _backward_query_kernel[grid](
            grad_out,
            qkv,
            perm,
            valid,
            lse,
            delta,
            grad,
            N,
            C,
            perm.shape[1],
            overlap,
            *_split(scale, qkv.dtype),
            BLOCK_Q=cfg['block_s'],
            BLOCK_K=cfg['block_k'],
            **common)
        _backward_key_kernel[grid](
            grad_out,
            grad_image,
            qkv,
            perm,
            valid,
            lse,
            delta,
            grad,
            N,
            C,
            perm.shape[1],
            overlap,
            *_split(scale, qkv.dtype),
            BLOCK_S=cfg['block_s'],
            BLOCK_Q=cfg['block_k'],
            HAS_IMAGE=has_image,
            **common)
    return grad
