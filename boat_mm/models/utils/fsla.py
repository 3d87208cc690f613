# Copyright (c) boat-mm contributors. All rights reserved.
"""Feature-space local attention (FSLA), the module BOAT adds to a block
(Yu et al., BMVC 2022; the published code:
https://github.com/mahaoyuHKU/pytorch-boat), written for boat-mm from the
paper and that code: docs/fsla.md states the algorithm and what differs."""
import inspect
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from boat_mm.ops import (ClusterPlan, balanced_hierarchical_clustering,
                         build_cluster_plan, check_impl, cluster_ids_from_perm,
                         clustered_attention, perm_covers_tokens)
from boat_mm.ops._backends import ATTENTION, CLUSTERING, select_backend
from boat_mm.registry import MODELS
from .arch import (check_heads, check_int, check_number, check_qk_scale,
                   check_rate, check_tokens)
from .depthwise import DepthwiseConv2d

__all__ = ['FeatureSpaceLocalAttention']


def _check_replaced_perm(replaced: Tensor, perm: Tensor, plan: ClusterPlan,
                         hook: Callable) -> None:
    """A cluster hook's ``perm`` puts every token in one real slot of
    every row, as the clustering's does; else the attention would mix
    tokens silently. (A sort and a sync: for replaced perms only.)"""
    name = getattr(hook, '__qualname__', repr(hook))
    if not isinstance(replaced, Tensor) or replaced.shape != perm.shape \
            or replaced.dtype != perm.dtype:
        got = (f'{tuple(replaced.shape)} {replaced.dtype}' if isinstance(
            replaced, Tensor) else type(replaced).__name__)
        raise ValueError(
            f'cluster hook {name} returned {got}; a replaced perm is a '
            f'{tuple(perm.shape)} {perm.dtype} tensor, as the one it got.')
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return  # data-dependent: checked in eager mode only
    if not perm_covers_tokens(replaced, plan):
        raise ValueError(
            f'cluster hook {name} returned a perm whose real slots '
            f'(plan.slot_valid) do not hold every token 0 .. '
            f'{plan.num_tokens - 1} once per row: a perm orders the tokens, '
            f'it cannot drop or repeat one.')


@MODELS.register_module()
class FeatureSpaceLocalAttention(BaseModule):
    """Feature-space local attention of BOAT (Yu et al., BMVC 2022).

    Tokens of the whole feature map are grouped into balanced clusters by a
    hierarchical binary soft k-means on each head's query vectors, and
    self-attention runs inside each cluster; cluster ``2j`` also attends to
    the first ``overlap`` tokens of its sibling ``2j+1`` and vice versa (the
    last ``overlap`` of ``2j``). A depthwise 3x3 convolution of the values
    in image layout is added before the output projection.

    Any ``H x W`` works. The ``N = H * W`` tokens go into ``G = 2**L``
    clusters, the leaves of a complete binary tree, with ``L`` chosen so
    that the mean cluster size ``N / G`` is closest to ``group_size`` on a
    log scale without exceeding ``MAX_MEAN_CLUSTER * group_size``
    (:data:`boat_mm.ops.clustering.MAX_MEAN_CLUSTER`); cluster sizes differ
    by at most one token (see :mod:`boat_mm.ops.clustering` and
    ``docs/fsla.md``). A map of at most ``MAX_MEAN_CLUSTER * group_size``
    tokens is a single cluster, which attends within itself with no
    overlap.
    For ``N = group_size * 2**L`` the result equals the published algorithm.
    Each sample is clustered on its own, so outputs never depend on other
    samples of the batch.

    The cluster layout depends on ``N`` only and is cached per resolution;
    under ``torch.compile`` it is specialised per shape, so compile with
    ``dynamic=False`` (``fullgraph=True`` works, forward and backward).

    Args:
        embed_dims (int): Number of channels ``C``.
        num_heads (int): Number of attention heads; must divide ``C``.
        group_size (int): Target cluster size. Defaults to 49.
        overlap (int): Keys borrowed from the sibling cluster, smaller than
            ``group_size``. Defaults to 20.
        kmeans_iters (int): Soft k-means iterations per split. Defaults to 2.
        kmeans_temperature (float): Softmax temperature of the soft
            assignment. Defaults to 100.
        qk_scale (float, optional): Logit scale, positive; None for
            ``head_dim ** -0.5``. The published BOAT-CSWin weights need 1.0.
            Defaults to None.
        qkv_bias (bool): Bias of the qkv projection. Defaults to True.
        attn_drop (float): Dropout on attention weights (the tensor ops
            only: not with ``attention_impl`` ``'cpp'`` or ``'triton'``).
            Defaults to 0.
        proj_drop (float): Dropout after the output projection.
            Defaults to 0.
        clustering_impl (str): ``'auto'`` (the Triton kernels for CUDA
            tensors, the C++ kernel for CPU tensors when built, tensor ops
            otherwise), ``'cpp'``, ``'triton'`` or ``'tensor'``; see
            :func:`boat_mm.ops.balanced_hierarchical_clustering`. Defaults
            to ``'auto'``.
        attention_impl (str): ``'auto'`` (without attention dropout: the
            Triton kernels for float32/bfloat16/float16 CUDA tensors, the
            fused C++ op for float32/float64 CPU tensors when built; tensor
            ops and SDPA otherwise), ``'cpp'``, ``'triton'`` or
            ``'tensor'``; see :func:`boat_mm.ops.clustered_attention`.
            Defaults to ``'auto'``.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 group_size: int = 49,
                 overlap: int = 20,
                 kmeans_iters: int = 2,
                 kmeans_temperature: float = 100.,
                 qk_scale: Optional[float] = None,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 clustering_impl: str = 'auto',
                 attention_impl: str = 'auto',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self._check_arguments(
            dict(
                embed_dims=embed_dims,
                num_heads=num_heads,
                group_size=group_size,
                overlap=overlap,
                kmeans_iters=kmeans_iters,
                kmeans_temperature=kmeans_temperature,
                qk_scale=qk_scale,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                clustering_impl=clustering_impl,
                attention_impl=attention_impl))
        self.clustering_impl = clustering_impl
        self.attention_impl = attention_impl
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.group_size = group_size
        self.overlap = overlap
        self.kmeans_iters = kmeans_iters
        self.kmeans_temperature = kmeans_temperature
        self.scale = self.head_dims**-0.5 if qk_scale is None else qk_scale
        self.attn_drop = attn_drop

        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.get_v = DepthwiseConv2d(embed_dims)
        self._cluster_hooks: 'OrderedDict[int, Callable]' = OrderedDict()

    @classmethod
    def check_arguments(cls, **kwargs: Any) -> None:
        """Validate the arguments of ``cls(**kwargs)`` without building it
        (the same errors as ``__init__``): the backbones check their
        ``fsla_cfg`` with it before a model is built.

        Args:
            **kwargs: The arguments (``embed_dims``, ``num_heads`` and the
                others that ``__init__`` takes); defaults where not given.

        Raises:
            TypeError, ValueError: As ``cls(**kwargs)`` would.
        """
        args = inspect.signature(cls.__init__).bind(None, **kwargs)
        args.apply_defaults()
        cls._check_arguments(args.arguments)

    @classmethod
    def _check_arguments(cls, args: Dict[str, Any]) -> None:
        """The checks of ``__init__`` and :meth:`check_arguments`.

        Args:
            args (dict): The arguments, by name.
        """
        embed_dims = args['embed_dims']
        num_heads = args['num_heads']
        group_size = args['group_size']
        overlap = args['overlap']
        kmeans_iters = args['kmeans_iters']
        kmeans_temperature = args['kmeans_temperature']
        qk_scale = args['qk_scale']
        attn_drop = args['attn_drop']
        proj_drop = args['proj_drop']
        clustering_impl = args['clustering_impl']
        attention_impl = args['attention_impl']
        name = cls.__name__
        check_int(embed_dims, 'embed_dims', name)
        check_int(num_heads, 'num_heads', name)
        check_int(group_size, 'group_size', name)
        check_int(overlap, 'overlap', name, minimum=0)
        check_int(kmeans_iters, 'kmeans_iters', name, minimum=0)
        # <= 0 would make the soft assignment uniform or repulsive.
        check_number(kmeans_temperature, 'kmeans_temperature', name)
        check_rate(attn_drop, 'attn_drop', name)
        check_rate(proj_drop, 'proj_drop', name)
        check_heads(embed_dims, num_heads, name)
        if not 0 <= overlap < group_size:
            raise ValueError(
                f'overlap ({overlap}) must be >= 0 and smaller than '
                f'group_size ({group_size}); lower overlap (it defaults to '
                f'20: a group_size of 20 or less needs an overlap too).')
        check_qk_scale(qk_scale, name)
        check_impl(clustering_impl, 'clustering_impl')
        check_impl(attention_impl, 'attention_impl')
        if attn_drop and attention_impl in ('cpp', 'triton'):
            # Else it would build, run in eval() and fail in train().
            raise ValueError(
                f"{name}: attention_impl='{attention_impl}' has no "
                f'attention dropout, got attn_drop={attn_drop}; use '
                f"attention_impl='auto' (the tensor ops while training "
                f"with dropout) or 'tensor', or attn_drop=0.")

    def _check_input(self, x: Tensor, hw_shape: Sequence[int]) -> None:
        check_tokens(x, hw_shape, self.embed_dims, 'FSLA')

    def _plan(self, num_tokens: int, device: torch.device) -> ClusterPlan:
        """The cluster layout of ``num_tokens`` tokens (cached per N)."""
        return build_cluster_plan(num_tokens, self.group_size, self.overlap,
                                  device)

    def _cluster(self, qkv: Tensor, plan: ClusterPlan) -> Tensor:
        """Cluster the per-head queries: ``(B * heads, slots)`` perm."""
        self._check_impl_runs(CLUSTERING, qkv)
        B, N, _ = qkv.shape
        q = qkv.detach()[..., :self.embed_dims]
        q = q.reshape(B, N, self.num_heads, self.head_dims).transpose(1, 2)
        return balanced_hierarchical_clustering(
            q.reshape(B * self.num_heads, N, self.head_dims), plan,
            self.kmeans_iters, self.kmeans_temperature, self.clustering_impl)

    def _check_impl_runs(self, op: str, qkv: Tensor) -> None:
        """Refuse a ``clustering_impl`` or ``attention_impl`` that cannot
        run ``op`` on this input, naming that argument (the ops' own
        errors name their ``impl``).

        Args:
            op (str): ``'balanced_clustering'`` or
                ``'clustered_attention'``.
            qkv (Tensor): The input, whose device and dtype the ops get.
        """
        name = 'clustering_impl' if op == CLUSTERING else 'attention_impl'
        impl = getattr(self, name)
        if impl != 'auto':
            dropout_p = self.attn_drop if self.training else 0.
            select_backend(op, impl, qkv, dropout_p, name=name)

    def register_cluster_hook(
        self, hook: Callable[['FeatureSpaceLocalAttention', Tensor],
                             Optional[Tensor]]
    ) -> RemovableHandle:
        """Call ``hook(module, perm)`` on every clustering of a forward.

        The clusters are computed inside :meth:`forward`, so forward hooks
        cannot see them; this hook can, and may replace them: a returned
        tensor (same shape) is used as ``perm`` instead, e.g. the clusters
        of an exported model, to tell a flipped near-tie from an error.
        Maps of one cluster have no ``perm`` and call no hook.

        Under activation checkpointing (a backbone's ``with_cp=True``) the
        forward of a training step runs twice, so the hook is called
        twice per step: a hook that counts must allow for it, and one that
        replaces ``perm`` must return the same for the same input, or the
        recomputed forward differs from the one the gradients are for.

        Args:
            hook (Callable): ``hook(module, perm) -> Tensor | None`` with
                ``perm`` the ``(B * num_heads, slots)`` token of every slot
                (see :meth:`cluster_perm`).

        Returns:
            RemovableHandle: ``handle.remove()`` removes the hook.
        """
        handle = RemovableHandle(self._cluster_hooks)
        self._cluster_hooks[handle.id] = hook
        return handle

    @torch.no_grad()
    def cluster_perm(
            self, x: Tensor,
            hw_shape: Sequence[int]) -> Tuple[Optional[Tensor], ClusterPlan]:
        """The clustering that :meth:`forward` computes for ``x``.

        With the plan, it gives every query's keys exactly (see
        :func:`boat_mm.ops.clustered_attention`), for analysis. The cluster
        hooks (:meth:`register_cluster_hook`), which may replace it in the
        forward, are not called here.

        Args:
            x (Tensor): ``(B, N, C)`` tokens (the module's input).
            hw_shape (Sequence[int]): ``(H, W)``.

        Returns:
            tuple[Tensor | None, ClusterPlan]: The ``(B * num_heads,
            slots)`` token of every slot (rows in ``(batch, head)`` order;
            None when the plan has one cluster) and the plan.
        """
        self._check_input(x, hw_shape)
        plan = self._plan(x.shape[1], x.device)
        if plan.num_clusters == 1:
            return None, plan
        return self._cluster(self.qkv(x), plan), plan

    @torch.no_grad()
    def cluster_ids(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Cluster index of every token, for analysis and visualisation.

        Args:
            x (Tensor): ``(B, N, C)`` tokens (the module's input).
            hw_shape (Sequence[int]): ``(H, W)``.

        Returns:
            Tensor: ``(B, num_heads, N)`` int64 cluster ids.
        """
        perm, plan = self.cluster_perm(x, hw_shape)
        B, N, _ = x.shape
        if perm is None:
            return x.new_zeros(B, self.num_heads, N, dtype=torch.long)
        return cluster_ids_from_perm(perm, plan).view(B, self.num_heads, N)

    def forward(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward.

        Args:
            x (Tensor): ``(B, N, C)`` tokens in raster order.
            hw_shape (Sequence[int]): ``(H, W)`` with ``H * W == N``.

        Returns:
            Tensor: ``(B, N, C)``.
        """
        self._check_input(x, hw_shape)
        B, N, C = x.shape
        H, W = hw_shape
        qkv = self.qkv(x)
        plan = self._plan(N, x.device)
        perm = None
        if plan.num_clusters > 1:
            perm = self._cluster(qkv, plan)
            for hook in self._cluster_hooks.values():
                replaced = hook(self, perm)
                if replaced is not None:
                    _check_replaced_perm(replaced, perm, plan, hook)
                    perm = replaced
        self._check_impl_runs(ATTENTION, qkv)
        out, v = clustered_attention(
            qkv,
            perm,
            plan,
            self.num_heads,
            scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.,
            hw_shape=(H, W),
            impl=self.attention_impl)
        # Local term: depthwise 3x3 conv of the values in image layout.
        out = out + self.get_v(v).flatten(2).transpose(1, 2)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        """The settings shown in the module's repr.

        Returns:
            str: ``embed_dims``, ``num_heads``, the layout and the scale.
        """
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'group_size={self.group_size}, overlap={self.overlap}, '
                f'scale={self.scale:.4g}')
