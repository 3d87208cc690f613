# Copyright (c) boat-mm contributors. All rights reserved.
"""A FlashAttention-style 7x7 window attention in Triton: the baseline of
``benchmarks/gpu_model.py``.

Written the way FSLA's kernels are (``boat_mm/ops/triton/
clustered_attention.py``): one program per ``(window, sample * head)``
reads the q, k and v rows of its window straight from the ``(B, N, 3C)``
qkv, keeps the whole window (49 tokens in a 64-row tile) in registers and
writes the output in raster order with its log-sum-exp; the backward is
one kernel per window with the five products of an attention backward
(``S = QK^T``, ``dP = dO V^T``, ``dV = P^T dO``, ``dQ = dS K``,
``dK = dS^T Q``), ``D = rowsum(dO * O)`` computed in the kernel. Windows
at the right and bottom edges hold fewer tokens (no padding tokens are
attended, no relative position bias: the cheapest window attention of
that shape). It only serves as the model's baseline; the model checks it
against plain attention in float64 (``gpu_model.py --check``).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

WINDOW = 7


@triton.jit
def _window_tokens(H, W, WIN: tl.constexpr, BLOCK: tl.constexpr):
    """Raster tokens of program ``(window, m)``'s window and their
    validity."""
    win = tl.program_id(0)
    nww = (W + WIN - 1) // WIN
    r0 = (win // nww) * WIN
    c0 = (win % nww) * WIN
    offs = tl.arange(0, BLOCK)
    r = r0 + offs // WIN
    c = c0 + offs % WIN
    ok = (offs < WIN * WIN) & (r < H) & (c < W)
    return tl.where(ok, r * W + c, 0), ok


@triton.jit
def _window_forward_kernel(qkv, out, lse, H, W, N, C, scale,
                           HEADS: tl.constexpr, D: tl.constexpr,
                           WIN: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(1)
    b = (m // HEADS).to(tl.int64)
    head = m % HEADS
    tok, ok = _window_tokens(H, W, WIN, BLOCK)
    offs_d = tl.arange(0, D)
    rows = qkv + (b * N + tok[:, None]) * (3 * C) + head * D + offs_d[None, :]
    mask = ok[:, None]
    q = tl.load(rows, mask=mask, other=0.)
    k = tl.load(rows + C, mask=mask, other=0.)
    v = tl.load(rows + 2 * C, mask=mask, other=0.)
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(ok[None, :], s, float('-inf'))
    row_max = tl.max(s, 1)
    p = tl.exp(s - row_max[:, None])
    denom = tl.sum(p, 1)
    o = tl.dot(p.to(v.dtype), v) / denom[:, None]
    dst = out + (b * N + tok[:, None]) * C + head * D + offs_d[None, :]
    tl.store(dst, o.to(out.dtype.element_ty), mask=mask)
    tl.store(lse + m.to(tl.int64) * N + tok, row_max + tl.log(denom), mask=ok)


@triton.jit
def _window_backward_kernel(grad_out, qkv, out, lse, grad, H, W, N, C, scale,
                            HEADS: tl.constexpr, D: tl.constexpr,
                            WIN: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(1)
    b = (m // HEADS).to(tl.int64)
    head = m % HEADS
    tok, ok = _window_tokens(H, W, WIN, BLOCK)
    offs_d = tl.arange(0, D)
    mask = ok[:, None]
    rows = (b * N + tok[:, None]) * (3 * C) + head * D + offs_d[None, :]
    q = tl.load(qkv + rows, mask=mask, other=0.)
    k = tl.load(qkv + rows + C, mask=mask, other=0.)
    v = tl.load(qkv + rows + 2 * C, mask=mask, other=0.)
    orows = (b * N + tok[:, None]) * C + head * D + offs_d[None, :]
    do = tl.load(grad_out + orows, mask=mask, other=0.)
    o = tl.load(out + orows, mask=mask, other=0.)
    lse_i = tl.load(lse + m.to(tl.int64) * N + tok, mask=ok, other=0.)
    delta = tl.sum(do.to(lse_i.dtype) * o.to(lse_i.dtype), 1)
    s = tl.dot(q, tl.trans(k)) * scale
    p = tl.where(ok[None, :], tl.exp(s - lse_i[:, None]), 0.)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
    dp = tl.dot(do, tl.trans(v))
    ds = (p * (dp - delta[:, None]) * scale).to(q.dtype)
    dq = tl.dot(ds, k)
    dk = tl.dot(tl.trans(ds), q)
    ty = grad.dtype.element_ty
    tl.store(grad + rows, dq.to(ty), mask=mask)
    tl.store(grad + rows + C, dk.to(ty), mask=mask)
    tl.store(grad + rows + 2 * C, dv.to(ty), mask=mask)


def _grid(hw: Tuple[int, int], rows: int) -> Tuple[int, int]:
    H, W = hw
    return (-(-H // WINDOW) * -(-W // WINDOW), rows)


def window_attention_forward(qkv: Tensor, hw: Tuple[int, int],
                             heads: int) -> Tuple[Tensor, Tensor]:
    """Output ``(B, N, C)`` and log-sum-exp ``(B * heads, N)`` (float32,
    float64 for float64) of 7x7 window attention of a ``(B, N, 3C)``
    qkv."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    out = qkv.new_empty(B, N, C)
    lse = torch.empty(
        B * heads,
        N,
        dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32,
        device=qkv.device)
    _window_forward_kernel[_grid(hw, B * heads)](
        qkv,
        out,
        lse,
        hw[0],
        hw[1],
        N,
        C, (C // heads)**-0.5,
        HEADS=heads,
        D=C // heads,
        WIN=WINDOW,
        BLOCK=64,
        num_warps=4)
    return out, lse


def window_attention_backward(grad_out: Tensor, qkv: Tensor, out: Tensor,
                              lse: Tensor, hw: Tuple[int, int],
                              heads: int) -> Tensor:
    """The ``(B, N, 3C)`` qkv gradient of :func:`window_attention_forward`
    (every row written once)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    grad = torch.empty_like(qkv)
    _window_backward_kernel[_grid(hw, B * heads)](
        grad_out.contiguous(),
        qkv,
        out,
        lse,
        grad,
        hw[0],
        hw[1],
        N,
        C, (C // heads)**-0.5,
        HEADS=heads,
        D=C // heads,
        WIN=WINDOW,
        BLOCK=64,
        num_warps=4)
    return grad
