# Copyright (c) boat-mm contributors. All rights reserved.
"""Attention inside feature-space clusters, with sibling overlap.

Given the slot layout of :mod:`boat_mm.ops.clustering`, every real token is
a query in exactly one cluster. Cluster ``2j`` additionally attends to the
first ``overlap`` tokens of its sibling ``2j+1`` and ``2j+1`` to the last
``overlap`` tokens of ``2j`` (the sibling's tokens nearest the split).

Instead of copying the borrowed keys into every cluster, attention runs on
each *pair* of siblings (``2S`` slots) with one static boolean mask (see
:func:`boat_mm.ops.clustering._sibling_mask`), so the keys are read in
place. Tokens move into cluster order with one row gather for each of q,
k and v, whose backward writes every gradient row exactly once
(``index_copy_``), and back to raster order with one gather whose backward
gathers with the inverse permutation: deterministic, no scatter-add.

Two implementations compute it, chosen by ``impl`` in
:func:`clustered_attention`:

* ``'tensor'``: the gathers above and SDPA, for any device and dtype.
* ``'cpp'``: the C++ CPU op ``torch.ops.boat_mm.clustered_attention``
  (``boat_mm/ops/csrc/clustered_attention.cpp``, float32/float64, no
  attention dropout), which fuses the gathers, runs each cluster against
  exactly its own and its borrowed keys (no masked-out pairs) in buffers
  that stay in cache, and writes straight to raster order; its backward
  recomputes the probabilities from the saved log-sum-exp. It has fake
  kernels and an autograd formula, so ``torch.compile`` traces it.

``'auto'`` (the default) takes the C++ op for float32/float64 CPU tensors
without attention dropout when it is built, and the tensor ops otherwise
(also under ``torch.jit`` tracing, so that FLOP counters see the SDPA).
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import clustering as _clustering
from .clustering import ClusterPlan, check_impl

__all__ = ['permute_rows', 'inverse_slots', 'clustered_attention']


def _register_cpu_kernel() -> None:
    """Fake kernels and the autograd formula of the C++ op."""

    @torch.library.register_fake('boat_mm::clustered_attention')
    def _fake(qkv: Tensor, perm: Tensor, slot_valid: Tensor, num_heads: int,
              slot_size: int, overlap: int, scale: float,
              hw_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
        B, N, C3 = qkv.shape
        image = (qkv.new_empty(B, C3 // 3, *hw_shape)
                 if len(hw_shape) else qkv.new_empty(0))
        return qkv.new_empty(B, N, C3 // 3), image, qkv.new_empty(perm.shape)

    @torch.library.register_fake('boat_mm::clustered_attention_backward')
    def _fake_backward(grad_out: Tensor, grad_image: Tensor, qkv: Tensor,
                       perm: Tensor, slot_valid: Tensor, lse: Tensor,
                       num_heads: int, slot_size: int, overlap: int,
                       scale: float) -> Tensor:
        return torch.empty_like(qkv)

    def setup_context(ctx, inputs, output) -> None:
        qkv, perm, slot_valid, *args, _ = inputs
        ctx.save_for_backward(qkv, perm, slot_valid, output[2])
        ctx.args = args  # num_heads, slot_size, overlap, scale

    def backward(ctx, grad_out: Tensor, grad_image: Tensor, _grad_lse):
        qkv, perm, slot_valid, lse = ctx.saved_tensors
        grad = torch.ops.boat_mm.clustered_attention_backward(
            grad_out, grad_image, qkv, perm, slot_valid, lse, *ctx.args)
        return (grad, ) + (None, ) * 7

    torch.library.register_autograd(
        'boat_mm::clustered_attention', backward,
        setup_context=setup_context)


if _clustering.cpu_kernel_available():
    _register_cpu_kernel()


def _use_cpu_kernel(qkv: Tensor, dropout_p: float, impl: str) -> bool:
    """Whether :func:`clustered_attention` runs the C++ op (see above)."""
    check_impl(impl)
    if impl == 'tensor':
        return False
    # Looked up on the module, so that tests can switch the kernels off.
    built = _clustering._HAS_CPU_KERNEL
    supported = qkv.dtype in (torch.float32, torch.float64)
    if impl == 'auto':
        return (built and qkv.device.type == 'cpu' and supported
                and dropout_p == 0 and not torch.jit.is_tracing()
                and not torch.onnx.is_in_onnx_export())
    if not built:
        raise _clustering._kernels_not_built()
    if qkv.device.type != 'cpu' or not supported or dropout_p != 0:
        raise ValueError(
            f"impl='cpp' supports float32/float64 CPU tensors without "
            f"attention dropout, got a {qkv.dtype} tensor on {qkv.device} "
            f"and dropout_p={dropout_p}; use impl='auto' or 'tensor'.")
    return True


class _PermuteRows(torch.autograd.Function):
    """``out = src[index]`` whose backward is ``grad_src = grad[inverse]``.

    Valid when every row of ``src`` is read by exactly one row of ``out``
    that carries gradient (``inverse`` names it); other rows of ``out`` may
    read any row of ``src``, as long as their gradients never reach rows
    that matter (padding slots, see :func:`clustered_attention`).
    """

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return _gather_rows(src, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse, = ctx.saved_tensors
        return _gather_rows(grad, inverse), None, None


class _GatherQKV(torch.autograd.Function):
    """The q, k and v rows of every slot, gathered from the qkv tensor.

    The backward writes each of the three gradients straight into its rows
    of the qkv gradient with ``index_copy_``: every qkv row is read by
    exactly one real slot, so each is written once (no zero fill, no
    accumulation, deterministic), and padding slots write spare rows past
    the end that are dropped. Separate q, k, v outputs also spare autograd
    the stack of their three gradients that an ``unbind`` would need.

    With ``hw_shape``, the values are also returned as a ``(B, C, H, W)``
    image (FSLA's local term) whose gradient is added to the value
    channels in place.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, src_row: Tensor, dst_row: Tensor,
                head_dims: int, hw_shape: Optional[Tuple[int, int]]):
        flat = qkv.reshape(-1, head_dims)
        q, k, v = (_gather_rows(flat, idx) for idx in src_row)
        ctx.save_for_backward(dst_row)
        ctx.shape, ctx.head_dims = qkv.shape, head_dims
        if hw_shape is None:
            return q, k, v, qkv.new_empty(0)
        return q, k, v, _value_image(qkv, hw_shape)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor,
                 grad_image: Optional[Tensor]):
        dst_row, = ctx.saved_tensors
        B, N, C3 = ctx.shape
        d = ctx.head_dims
        real_rows = B * N * C3 // d
        buf = grad_q.new_empty(dst_row.numel(), d)
        for rows, g in zip(dst_row, (grad_q, grad_k, grad_v)):
            buf.index_copy_(0, rows, g.reshape(-1, d))
        grad = buf[:real_rows].view(B, N, C3)
        if grad_image is not None and grad_image.numel():
            grad[..., 2 * C3 // 3:] += grad_image.flatten(2).transpose(1, 2)
        return grad, None, None, None, None


def _value_image(qkv: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
    """The value channels of a ``(B, N, 3C)`` qkv as a ``(B, C, H, W)`` map."""
    B, N, C3 = qkv.shape
    return qkv[..., 2 * C3 // 3:].transpose(1, 2).reshape(
        B, C3 // 3, *hw_shape)


def _gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """``src.index_select(0, index)``."""
    if src.dim() == 2 and src.device.type == 'cpu':
        # embedding() gathers rows of a 2-d tensor 2-3x faster than
        # index_select() on the CPU (same result).
        return F.embedding(index, src.contiguous())
    return src.index_select(0, index)


def permute_rows(src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """Gather rows ``src[index]`` with a gather-based backward.

    Args:
        src (Tensor): ``(R, ...)`` rows to read.
        index (Tensor): ``(R',)`` int64 rows of ``src`` to read.
        inverse (Tensor): ``(R,)`` int64, for each row of ``src`` the row of
            the output that reads it (its gradient source).

    Returns:
        Tensor: ``(R', ...)``.
    """
    return _PermuteRows.apply(src, index, inverse)


def inverse_slots(perm: Tensor, plan: ClusterPlan) -> Tensor:
    """For every token, the slot that holds it as a real token.

    Args:
        perm (Tensor): ``(M, slots)`` from the clustering.
        plan (ClusterPlan): Its plan.

    Returns:
        Tensor: ``(M, N)`` int64 slot indices in ``[0, 2 * P * S)``.
    """
    M, N = perm.shape[0], plan.num_tokens
    used = perm[:, :plan.slot_valid.numel()]
    slot = torch.arange(used.shape[1], device=perm.device).expand(M, -1)
    # Padding slots write to a spare column N, which is dropped: each real
    # column is written exactly once, so the scatter is deterministic.
    target = torch.where(plan.slot_valid, used, N)
    inv = slot.new_zeros(M, N + 1).scatter_(1, target, slot)
    return inv[:, :N]


def clustered_attention(
        qkv: Tensor,
        perm: Tensor,
        plan: ClusterPlan,
        num_heads: int,
        scale: Optional[float] = None,
        dropout_p: float = 0.,
        hw_shape: Optional[Tuple[int, int]] = None,
        impl: str = 'auto') -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Multi-head attention inside clusters with sibling overlap.

    Args:
        qkv (Tensor): ``(B, N, 3 * C)`` the output of the qkv projection,
            channels laid out as ``(3, num_heads, head_dim)``.
        perm (Tensor): ``(B * num_heads, slots)`` from
            :func:`boat_mm.ops.balanced_hierarchical_clustering`, rows in
            ``(batch, head)`` order. Ignored when ``plan`` has one cluster.
        plan (ClusterPlan): The plan for ``N``.
        num_heads (int): Number of heads ``h``.
        scale (float, optional): Logit scale; None for ``head_dim ** -0.5``.
        dropout_p (float): Attention dropout probability.
        hw_shape (tuple[int, int], optional): ``(H, W)``; when given, the
            values are also returned as a ``(B, C, H, W)`` image (FSLA's
            local term), taken from ``qkv`` together with the attention
            inputs so that their gradients are assembled in one tensor.
        impl (str): ``'auto'``, ``'cpp'`` (the C++ CPU op) or ``'tensor'``;
            see the module docstring. Defaults to ``'auto'``.

    Returns:
        Tensor | tuple[Tensor, Tensor]: ``(B, N, C)`` attention output in
        raster order, channels in ``(num_heads, head_dim)`` order; with
        ``hw_shape``, also the ``(B, C, H, W)`` values.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    h, d = num_heads, C // num_heads
    use_cpp = _use_cpu_kernel(qkv, dropout_p, impl)
    if plan.num_clusters == 1:
        # One cluster: plain attention, no permutation needed at all.
        q, k, v = qkv.view(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        if hw_shape is None:
            return out
        return out, _value_image(qkv, hw_shape)
    if use_cpp:
        out, v_image, _ = torch.ops.boat_mm.clustered_attention(
            qkv, perm, plan.slot_valid, h, plan.slot_size, plan.overlap,
            d**-0.5 if scale is None else float(scale),
            [] if hw_shape is None else [int(n) for n in hw_shape])
        return out if hw_shape is None else (out, v_image)

    M = B * h
    P, S = plan.num_pairs, plan.slot_size
    slots = 2 * P * S
    dev = qkv.device
    used = perm[:, :slots]  # (M, slots) token per slot
    inv = inverse_slots(perm, plan)  # (M, N) slot per token

    m = torch.arange(M, device=dev)
    b, head = (m // h).view(M, 1), (m % h).view(M, 1)
    # Row of qkv viewed as (B * N * 3 * h, d) for (which, m, slot).
    which = torch.arange(3, device=dev).view(3, 1, 1)
    src_row = ((b * N + used) * 3 + which) * h + head  # (3, M, slots)
    src_row = src_row.view(3, M * slots)
    if torch.is_grad_enabled() and qkv.requires_grad:
        # Gradient destinations: padding slots get spare rows after the
        # 3 * M * N real ones, so that every row is written once.
        dst_row = src_row
        if not plan.uniform:
            pad = (~plan.slot_valid).expand(3, M, slots).reshape(3, -1)
            spare = pad.reshape(-1).cumsum(0).view(3, -1) - 1 + 3 * M * N
            dst_row = torch.where(pad, spare, src_row)
        q, k, v, v_image = _GatherQKV.apply(qkv, src_row, dst_row, d,
                                            hw_shape)
    else:  # no backward: plain ops (also what tracers see)
        flat = qkv.reshape(-1, d)
        q, k, v = (_gather_rows(flat, rows) for rows in src_row)
        if hw_shape is not None:
            v_image = _value_image(qkv, hw_shape)
    q, k, v = (t.view(M, P, 2 * S, d) for t in (q, k, v))

    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=plan.attn_mask, dropout_p=dropout_p, scale=scale)

    # Back to raster order, (b, n, head) rows so the result is (B, N, C).
    out_row = (m.view(M, 1) * slots + inv).view(B, h, N).transpose(1, 2)
    back_row = (b * N + used) * h + head  # (M, slots) -> raster row
    out = permute_rows(
        out.reshape(M * slots, d), out_row.reshape(-1), back_row.reshape(-1))
    out = out.view(B, N, C)
    return out if hw_shape is None else (out, v_image)
