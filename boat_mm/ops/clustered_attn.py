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

Three implementations compute it, chosen by ``impl`` in
:func:`clustered_attention` (the choice is made in one place,
:mod:`boat_mm.ops._backends`; the op ``boat_mm::clustered_attention``, its
backward, fake kernels and autograd formula are defined once in
:mod:`boat_mm.ops._library`):

* ``'tensor'``: the gathers above and SDPA, for any device and dtype.
* ``'cpp'``: the C++ CPU kernels (``boat_mm/ops/csrc/
  clustered_attention.cpp``, float32/float64, no attention dropout),
  which fuse the gathers, run each cluster against exactly its own and
  its borrowed keys (no masked-out pairs) in buffers that stay in cache,
  and write straight to raster order; the backward recomputes the
  probabilities from the saved log-sum-exp.
* ``'triton'``: the same algorithm as FlashAttention-style Triton kernels
  for CUDA (``boat_mm/ops/triton/clustered_attention.py``; float32,
  bfloat16, float16 and float64, no attention dropout): one program per
  (cluster, sample * head) reads its rows straight from qkv through the
  permutation, with an online softmax in float32; the backward writes
  every qkv gradient row once. On CPU tensors they run in Triton's
  interpreter when ``TRITON_INTERPRET=1`` (tests).

``'auto'`` (the default) takes Triton for float32/bfloat16/float16 CUDA
tensors and the C++ op for float32/float64 CPU tensors when it is built,
both only without attention dropout, and the tensor ops otherwise, also
where the Triton kernels need more shared memory than the GPU has for
the input's dtype, cluster and head sizes (a warning says so once; with
``impl='triton'`` it is a :class:`~boat_mm.ops._library.
KernelResourcesError` that says what to change).
"""
from typing import Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ._backends import (ATTENTION, fit_to_gpu, select_backend,
                        warn_tensor_fallback)
from ._library import KernelResourcesError
from .clustering import ClusterPlan

__all__ = [
    'permute_rows', 'inverse_slots', 'perm_covers_tokens',
    'clustered_attention'
]


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
    def forward(ctx, qkv: Tensor, src_row: Tensor, dst_row: Optional[Tensor],
                head_dims: int, hw_shape: Optional[Tuple[int, int]]):
        flat = qkv.reshape(-1, head_dims)
        q, k, v = (_gather_rows(flat, idx) for idx in src_row)
        # None: the gradient goes back to the rows read (no padding).
        ctx.save_for_backward(src_row if dst_row is None else dst_row)
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
    return qkv[..., 2 * C3 // 3:].transpose(1,
                                            2).reshape(B, C3 // 3, *hw_shape)


def _gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """``src.index_select(0, index)``."""
    if src.dim() == 2 and src.device.type == 'cpu':
        # embedding() gathers rows of a 2-d tensor faster than
        # index_select() on the CPU, with the same result (the measured
        # factor: docs/benchmarks.md).
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


def _check_attention_inputs(qkv: Tensor, perm: Optional[Tensor],
                            plan: ClusterPlan, num_heads: int,
                            dropout_p: float,
                            hw_shape: Optional[Tuple[int, int]]) -> None:
    """Static checks (no data read), so that every backend fails alike,
    naming the mismatch, rather than in a reshape of the tensor ops."""
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f'qkv must be (B, N, 3 * C), got shape '
                         f'{tuple(qkv.shape)}.')
    N, C = qkv.shape[1], qkv.shape[2] // 3
    if num_heads < 1 or C % num_heads:
        raise ValueError(f'num_heads ({num_heads}) must divide the {C} '
                         f'channels of qkv (shape {tuple(qkv.shape)}).')
    if N != plan.num_tokens:
        raise ValueError(f'qkv has N={N} tokens but the plan is for '
                         f'{plan.num_tokens}; build the plan for N={N}.')
    if hw_shape is not None and (len(hw_shape) != 2
                                 or hw_shape[0] * hw_shape[1] != N):
        raise ValueError(f'hw_shape {tuple(hw_shape)} does not match N={N} '
                         f'tokens: need H * W == N.')
    if not 0 <= dropout_p <= 1:
        raise ValueError(f'dropout_p must be in [0, 1], got {dropout_p}.')
    if plan.num_clusters == 1:
        return  # perm is not read
    if perm is None:
        raise ValueError(
            f'perm is None but the plan has {plan.num_clusters} clusters; '
            f'pass the perm of balanced_hierarchical_clustering.')
    want = (qkv.shape[0] * num_heads, plan.slot_valid.numel())
    if (not isinstance(perm, Tensor) or perm.dtype != torch.int64
            or tuple(perm.shape) != want):
        got = (f'{perm.dtype} of shape {tuple(perm.shape)}' if isinstance(
            perm, Tensor) else type(perm).__name__)
        raise ValueError(
            f'perm must be int64 of shape (B * num_heads, slots) = {want} '
            f'for this plan, got {got}; take it from '
            f'balanced_hierarchical_clustering with the same plan (a plan '
            f'of another group_size or overlap lays the slots out '
            f'otherwise) and the queries of all B * num_heads heads.')


def perm_covers_tokens(perm: Tensor, plan: ClusterPlan) -> bool:
    """Whether the real slots of every row of ``perm`` hold each token
    once, as the clustering's do (a sync: reads the data).

    Args:
        perm (Tensor): ``(M, slots)`` int64.
        plan (ClusterPlan): Its plan.

    Returns:
        bool: True if every row is a permutation of the ``N`` tokens.
    """
    real = _real_slots(perm, plan)
    if real.numel():
        low, high = torch.aminmax(real)
        if int(low) < 0 or int(high) >= plan.num_tokens:
            return False
    return _covers(real, plan.num_tokens)


def _real_slots(perm: Tensor, plan: ClusterPlan) -> Tensor:
    """The tokens of ``perm``'s real slots (all of a uniform plan's, with
    no copy)."""
    return perm if plan.uniform else perm[:, plan.slot_valid]


def _covers(real: Tensor, num_tokens: int) -> bool:
    """Whether each row of ``real`` (tokens in ``[0, N)``, ``N`` per row)
    holds every token: then each once."""
    seen = torch.zeros(
        real.shape[0], num_tokens, dtype=torch.bool, device=real.device)
    return bool(seen.scatter_(1, real, True).all())


def _check_perm_values(perm: Tensor, plan: ClusterPlan) -> None:
    """Refuse a CPU ``perm`` with tokens outside ``[0, N)``, which a kernel
    would read (and, backward, write) unchecked, or whose real slots miss
    a token, whose output row no kernel would write.

    A ``perm`` from the clustering always passes; a hand-made one
    (:meth:`FeatureSpaceLocalAttention.register_cluster_hook`, direct
    calls) may not. Skipped on GPUs (it would synchronise), under
    tracing or compilation and for fake tensors (data-dependent).
    """
    if (perm.device.type != 'cpu' or torch.compiler.is_compiling()
            or torch.jit.is_tracing() or not perm.numel()
            or isinstance(perm, FakeTensor)):
        return
    N = plan.num_tokens
    low, high = (int(v) for v in torch.aminmax(perm))
    if low < 0 or high >= N:
        raise ValueError(
            f'perm holds token indices in [{low}, {high}], outside [0, '
            f'{N}) for N={N} tokens; take perm from '
            f'balanced_hierarchical_clustering for this N (a cluster hook '
            f'must return indices of the same map).')
    if not _covers(_real_slots(perm, plan), N):
        raise ValueError(
            f'perm\'s real slots (plan.slot_valid) do not hold every token '
            f'0 .. {N - 1} once per row; take perm from '
            f'balanced_hierarchical_clustering with the same plan (a perm '
            f'orders the tokens, it cannot drop or repeat one).')


# Looked up once (a private torch function; none: nothing is wrapped).
_is_functorch_wrapped = getattr(torch._C._functorch,
                                'is_functorch_wrapped_tensor',
                                lambda tensor: False)


def _check_reverse_mode(qkv: Tensor) -> None:
    """Refuse forward-mode AD and ``torch.func`` transforms, which the
    clustered paths do not support: torch gives the C++ and Triton ops,
    whose autograd is reverse-mode (``torch.library``), zero tangents
    without a word, and the tensor path's functions have no vmap rule.
    """
    if torch.compiler.is_compiling():
        return
    if (_is_functorch_wrapped(qkv)
            or fwAD.unpack_dual(qkv).tangent is not None):
        raise RuntimeError(
            'clustered_attention (FSLA) supports reverse-mode autograd only, '
            'not torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, '
            'vmap, hessian) or forward-mode AD (torch.autograd.forward_ad): '
            'with them its kernels would give wrong tangents. Differentiate '
            'with torch.autograd (loss.backward(), torch.autograd.grad, '
            'torch.autograd.functional.jacobian), and loop over samples for '
            'per-sample gradients.')


def clustered_attention(
        qkv: Tensor,
        perm: Optional[Tensor],
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
        perm (Tensor, optional): ``(B * num_heads, slots)`` from
            :func:`boat_mm.ops.balanced_hierarchical_clustering`, rows in
            ``(batch, head)`` order. Ignored (may be None) when ``plan`` has
            one cluster.
        plan (ClusterPlan): The plan for ``N``.
        num_heads (int): Number of heads ``h``.
        scale (float, optional): Logit scale; None for ``head_dim ** -0.5``.
        dropout_p (float): Attention dropout probability.
        hw_shape (tuple[int, int], optional): ``(H, W)``; when given, the
            values are also returned as a ``(B, C, H, W)`` image (FSLA's
            local term), taken from ``qkv`` together with the attention
            inputs so that their gradients are assembled in one tensor.
        impl (str): ``'auto'``, ``'cpp'`` (the C++ CPU op), ``'triton'``
            (the Triton kernels, CUDA) or ``'tensor'``; see the module
            docstring. Defaults to ``'auto'``.

    Returns:
        Tensor | tuple[Tensor, Tensor]: ``(B, N, C)`` attention output in
        raster order, channels in ``(num_heads, head_dim)`` order; with
        ``hw_shape``, also the ``(B, C, H, W)`` values.
    """
    _check_attention_inputs(qkv, perm, plan, num_heads, dropout_p, hw_shape)
    B, N, C3 = qkv.shape
    C = C3 // 3
    h, d = num_heads, C // num_heads
    backend = select_backend(ATTENTION, impl, qkv, dropout_p)
    if plan.num_clusters == 1:
        # One cluster: plain attention, no permutation needed at all.
        q, k, v = qkv.view(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        if hw_shape is None:
            return out
        return out, _value_image(qkv, hw_shape)
    assert perm is not None  # refused above for several clusters
    _check_reverse_mode(qkv)
    _check_perm_values(perm, plan)
    op = fit_to_gpu(backend, impl, qkv, h, plan.slot_size,
                    plan.overlap).op(ATTENTION)
    if op is not None:
        try:
            out, v_image, _ = op(
                qkv, perm, plan.slot_valid, h, plan.slot_size, plan.overlap,
                d**-0.5 if scale is None else float(scale),
                [] if hw_shape is None else [int(n) for n in hw_shape])
            return out if hw_shape is None else (out, v_image)
        except KernelResourcesError as e:
            if impl != 'auto':
                raise
            # Too large for this GPU where fit_to_gpu could not tell
            # (eager mode only): the tensor ops below.
            warn_tensor_fallback(str(e))

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
    # reshape: a perm given as a transposed view makes src_row one too.
    src_row = src_row.reshape(3, M * slots)
    if torch.is_grad_enabled() and qkv.requires_grad:
        # Gradient destinations: padding slots get spare rows after the
        # 3 * M * N real ones, so that every row is written once.
        # None, not src_row again: Dynamo refuses an autograd.Function given
        # one tensor twice (torch.compile(fullgraph=True) of a uniform map).
        dst_row = None
        if not plan.uniform:
            pad = (~plan.slot_valid).expand(3, M, slots).reshape(3, -1)
            spare = pad.reshape(-1).cumsum(0).view(3, -1) - 1 + 3 * M * N
            dst_row = torch.where(pad, spare, src_row)
        # int(): under torch.jit.trace (mmengine's FLOP counter) shapes are
        # 0-dim tensors, which the tracer cannot record as a Function's
        # non-tensor arguments.
        hw = None if hw_shape is None else tuple(int(n) for n in hw_shape)
        q, k, v, v_image = _GatherQKV.apply(qkv, src_row, dst_row, int(d), hw)
    else:  # no backward: plain ops
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
