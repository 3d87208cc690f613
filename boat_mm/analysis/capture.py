# Copyright (c) boat-mm contributors. All rights reserved.
"""Capture what FSLA modules compute during a normal forward pass.

* :func:`get_boat_backbone` / :func:`find_fsla_modules`: where FSLA is
  (:meth:`BaseBOATBackbone.fsla_modules`), by ``(stage, block)``;
* :func:`fsla_input_hooks`: the one capture mechanism, a context manager
  that hands the input of every forward of chosen FSLA modules to a
  function (forward pre-hooks, removed on exit);
* :func:`capture_fsla`: on it, the queries, keys and clustering of each
  call (:class:`FSLARecord`), for :mod:`.attention_recall`;
  :func:`boat_mm.visualization.capture_cluster_ids` is the cluster ids
  alone.

Nothing here patches a module; nothing is imported by ``import boat_mm``.
"""
from contextlib import contextmanager
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping,
                    NamedTuple, Optional, Sequence, Tuple, Union)

import torch
import torch.nn as nn
from torch import Tensor

from boat_mm.models.backbones import BaseBOATBackbone, boat_families
from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import ClusterPlan, build_cluster_plan, cluster_ids_from_perm

__all__ = [
    'Location', 'get_boat_backbone', 'find_fsla_modules', 'check_locations',
    'fsla_input_hooks', 'FSLARecord', 'TooManyTokensError', 'capture_fsla'
]

#: ``(stage, block)`` of an FSLA module.
Location = Tuple[int, int]


def get_boat_backbone(model: nn.Module) -> BaseBOATBackbone:
    """The BOAT backbone of a model, or the model if it is one.

    Args:
        model (nn.Module): A BOAT backbone (:class:`BaseBOATBackbone`), or
            a model with such a ``backbone`` attribute (mmpretrain's
            ``ImageClassifier``, mmseg's ``EncoderDecoder``, ...).

    Returns:
        BaseBOATBackbone: The BOAT backbone.

    Raises:
        TypeError: Neither the model nor its ``backbone`` is a BOAT.
    """
    if isinstance(model, BaseBOATBackbone):
        return model
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, BaseBOATBackbone):
        return backbone
    found = type(backbone if backbone is not None else model).__name__
    names = ' or '.join(f.__name__ for f in boat_families())
    folders = ' or '.join(f'configs/boat_{f.family}' for f in boat_families())
    raise TypeError(
        f'The backbone is a {found}, not a BOAT backbone ({names}): only '
        f'those have feature-space local attention clusters. Use a config '
        f'from {folders}, or set model.backbone.type to one of them.')


def find_fsla_modules(
        model: nn.Module) -> Dict[Location, FeatureSpaceLocalAttention]:
    """The FSLA modules of a BOAT backbone by ``(stage, block)``.

    Args:
        model (nn.Module): A BOAT backbone or a model holding one as
            ``backbone``.

    Returns:
        dict[tuple[int, int], FeatureSpaceLocalAttention]: Sorted by stage,
        then block; empty for a backbone built with ``with_fsla=False``.
    """
    return dict(sorted(get_boat_backbone(model).fsla_modules().items()))


def check_locations(available: Mapping[Location, nn.Module],
                    locations: Iterable[Location]) -> List[Location]:
    """Check that every location has an FSLA module.

    Args:
        available (Mapping[tuple, nn.Module]): FSLA modules by
            ``(stage, block)``, as :func:`find_fsla_modules` gives
            them.
        locations (Iterable[tuple]): The ``(stage, block)`` pairs asked for.

    Returns:
        list[tuple]: ``locations`` as ``(stage, block)`` int pairs.

    Raises:
        ValueError: Naming a location that is not in ``available``.
    """
    listed = ', '.join(f'(stage {i}, block {j})' for i, j in available)
    if not available:
        raise ValueError(
            'The backbone has no FSLA modules (built with with_fsla=False?); '
            'there are no clusters to capture.')
    wanted = [tuple(int(v) for v in loc) for loc in locations]
    for stage, block in wanted:
        if (stage, block) not in available:
            raise ValueError(
                f'Stage {stage}, block {block} has no FSLA module. FSLA '
                f'is in: {listed}.')
    return wanted


@contextmanager
def fsla_input_hooks(
    model: Union[nn.Module, Mapping[Location, FeatureSpaceLocalAttention]],
    fn: Callable[[Location, FeatureSpaceLocalAttention, Tensor, Location],
                 None],
    locations: Optional[Sequence[Location]] = None
) -> Iterator[List[Location]]:
    """Call ``fn(location, module, x, hw_shape)`` on the input of every
    forward of chosen FSLA modules, inside the ``with`` block.

    The one capture mechanism of boat-mm (forward pre-hooks, removed on
    exit, whatever happens): :func:`capture_fsla` and
    :func:`boat_mm.visualization.capture_cluster_ids` are built on it. The
    forward itself is unchanged.

    Args:
        model (nn.Module | Mapping): A BOAT backbone, a model holding one
            as ``backbone``, or FSLA modules by ``(stage, block)``.
        fn (Callable): Called with the ``(stage, block)`` location, the
            module, its ``(B, N, C)`` tokens and ``(H, W)``.
        locations (Sequence[tuple[int, int]], optional): ``(stage, block)``
            pairs to hook; None for all.

    Yields:
        list[tuple[int, int]]: The hooked locations, in order.

    Raises:
        TypeError: The model has no BOAT backbone.
        ValueError: A location has no FSLA module (the message lists the
            ones that have) or there is none at all.
    """
    available = (
        dict(model)
        if isinstance(model, Mapping) else find_fsla_modules(model))
    wanted = check_locations(available,
                             available if locations is None else locations)

    def make_hook(loc: Location):

        def hook(module: FeatureSpaceLocalAttention, args, kwargs):
            x = args[0] if args else kwargs['x']
            hw = args[1] if len(args) > 1 else kwargs['hw_shape']
            fn(loc, module, x, (int(hw[0]), int(hw[1])))

        return hook

    handles = [
        available[loc].register_forward_pre_hook(
            make_hook(loc), with_kwargs=True) for loc in wanted
    ]
    try:
        yield wanted
    finally:
        for handle in handles:
            handle.remove()


class TooManyTokensError(ValueError):
    """A map has more tokens than the caller allows (``max_tokens``)."""


class FSLARecord(NamedTuple):
    """What one FSLA module computed from its input in one forward call.

    Attributes:
        q (Tensor): ``(B, heads, N, d)`` queries (CPU).
        k (Tensor): ``(B, heads, N, d)`` keys (CPU).
        scale (float): Logit scale of the module.
        hw_shape (tuple[int, int]): The map, ``H * W == N``.
        perm (Tensor | None): ``(B * heads, slots)`` token of every slot
            (:meth:`FeatureSpaceLocalAttention.cluster_perm`); None for a
            single cluster.
        plan (ClusterPlan): The cluster layout (CPU tensors).
    """
    q: Tensor
    k: Tensor
    scale: float
    hw_shape: Tuple[int, int]
    perm: Optional[Tensor]
    plan: ClusterPlan

    @property
    def cluster_ids(self) -> Tensor:
        """``(B, heads, N)`` int64 cluster of every token."""
        B, h, N, _ = self.q.shape
        if self.perm is None:
            return torch.zeros(B, h, N, dtype=torch.long)
        return cluster_ids_from_perm(self.perm, self.plan).view(B, h, N)


@contextmanager
def capture_fsla(
    model: Union[nn.Module, Mapping[Location, FeatureSpaceLocalAttention]],
    locations: Optional[Sequence[Location]] = None,
    max_tokens: Optional[int] = None
) -> Iterator[Dict[Location, List[FSLARecord]]]:
    """Record the queries, keys and clusters of FSLA modules.

    Inside the ``with`` block, every forward of a chosen FSLA module appends
    an :class:`FSLARecord` to its list: the module's own ``qkv`` of the
    tokens it receives and :meth:`~FeatureSpaceLocalAttention.cluster_perm`,
    the clustering its forward computes (:func:`fsla_input_hooks`).

    Args:
        model (nn.Module | Mapping): A BOAT backbone, a model holding one
            as ``backbone``, or FSLA modules by ``(stage, block)``.
        locations (Sequence[tuple[int, int]], optional): ``(stage, block)``
            pairs to record; None for all.
        max_tokens (int, optional): Raise :class:`TooManyTokensError` (from
            the forward) when a recorded map has more tokens.

    Yields:
        dict[tuple[int, int], list[FSLARecord]]: Filled as forwards run.
    """
    records: Dict[Location, List[FSLARecord]] = {}

    def record(loc: Location, module: FeatureSpaceLocalAttention, x: Tensor,
               hw: Location) -> None:
        B, N, _ = x.shape
        if max_tokens is not None and N > max_tokens:
            raise TooManyTokensError(
                f'FSLA at stage {loc[0]}, block {loc[1]} sees a '
                f'{hw[0]}x{hw[1]} map ({N} tokens), more than '
                f'max_tokens={max_tokens}: full attention costs N^2 per '
                f'head. Use a smaller input or raise the limit.')
        with torch.no_grad():
            qkv = module.qkv(x)
            perm, _ = module.cluster_perm(x, hw)
        h, d = module.num_heads, module.head_dims
        qk = qkv[..., :2 * module.embed_dims].reshape(B, N, 2, h, d)
        qk = qk.permute(2, 0, 3, 1, 4).cpu()
        plan = build_cluster_plan(N, module.group_size, module.overlap)
        records[loc].append(
            FSLARecord(qk[0], qk[1], float(module.scale), hw,
                       None if perm is None else perm.cpu(), plan))

    with fsla_input_hooks(model, record, locations) as wanted:
        records.update({loc: [] for loc in wanted})
        yield records
