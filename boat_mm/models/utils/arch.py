# Copyright (c) boat-mm contributors. All rights reserved.
"""Argument helpers and stage freezing shared by the BOAT backbones."""
import os.path as osp
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch.nn as nn

__all__ = [
    'parse_arch', 'stage_widths', 'check_pretrained_file', 'parse_out_indices',
    'check_frozen_stages', 'fsla_settings', 'FrozenStagesMixin'
]


def parse_arch(arch: Union[str, dict], arch_zoo: Dict[str, dict],
               essential_keys: Set[str], name: str) -> dict:
    """Resolve ``arch`` (a zoo name or a dict), as mmpretrain does.

    Args:
        arch (str | dict): Name in ``arch_zoo`` or a custom setting.
        arch_zoo (dict): Known architectures.
        essential_keys (set[str]): Keys a custom dict must have.
        name (str): Backbone name, for error messages.

    Returns:
        dict: A copy of the architecture setting.
    """
    if isinstance(arch, str):
        key = arch.lower()
        if key not in arch_zoo:
            raise ValueError(
                f'Unknown {name} arch {arch!r}; choose one of '
                f'{sorted(set(arch_zoo))} or pass a dict with keys '
                f'{sorted(essential_keys)}.')
        return dict(arch_zoo[key])
    if isinstance(arch, dict):
        missing = essential_keys - set(arch)
        if missing:
            raise ValueError(f'Custom {name} arch misses keys '
                             f'{sorted(missing)}; it needs '
                             f'{sorted(essential_keys)}.')
        return dict(arch)
    raise TypeError(f'{name} arch must be a str or a dict, got '
                    f'{type(arch).__name__}.')


def stage_widths(embed_dims: Union[int, Sequence[int]], num_stages: int,
                 name: str) -> List[int]:
    """The width of every stage of an arch.

    Args:
        embed_dims (int | Sequence[int]): One width per stage, or an int:
            the first stage's width in an arch dict written as for
            mmpretrain's Swin (whose int ``embed_dims`` means stage ``i``
            has ``embed_dims * 2**i`` channels), which the configs use.
        num_stages (int): Number of stages.
        name (str): Backbone name, for error messages.

    Returns:
        list[int]: ``num_stages`` positive widths.
    """
    if isinstance(embed_dims, int):
        widths = [embed_dims * 2**i for i in range(num_stages)]
    else:
        widths = [int(w) for w in embed_dims]
    if len(widths) != num_stages or min(widths, default=0) < 1:
        raise ValueError(
            f'{name} arch: embed_dims must be a positive int or one '
            f'positive width per stage ({num_stages}), got {embed_dims}.')
    return widths


def check_pretrained_file(init_cfg: Optional[dict], name: str) -> None:
    """Fail early, with the fix, when a local pretrained file is missing."""
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    for cfg in cfgs:
        if not isinstance(cfg, dict) or cfg.get('type') != 'Pretrained':
            continue
        ckpt = str(cfg.get('checkpoint', ''))
        # MMEngine's local loader expands '~' too.
        if '://' in ckpt or osp.isfile(osp.expanduser(ckpt)):
            continue
        raise FileNotFoundError(
            f'{name}: pretrained checkpoint {ckpt!r} not found. Convert the '
            f'published BOAT weights with `python '
            f'tools/model_converters/boat2mm.py SRC {ckpt}`, point '
            f'init_cfg.checkpoint to an existing file, or set '
            f'`model.backbone.init_cfg=None` to train from scratch.')


def parse_out_indices(out_indices: Union[int, Sequence[int]],
                      num_stages: int) -> Tuple[int, ...]:
    """Sorted, de-duplicated stage indices; negative ones count from the end.

    Args:
        out_indices (int | Sequence[int]): Stages whose outputs are returned.
        num_stages (int): Number of stages of the backbone.

    Returns:
        tuple[int]: Indices in ``[0, num_stages)``.
    """
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    if len(out_indices) == 0:
        raise ValueError('out_indices must name at least one stage.')
    parsed = []
    for i in out_indices:
        j = i + num_stages if i < 0 else i
        if not 0 <= j < num_stages:
            raise ValueError(
                f'out_indices {tuple(out_indices)} must index one of '
                f'the {num_stages} stages; {i} is out of range.')
        parsed.append(j)
    return tuple(sorted(set(parsed)))


def check_frozen_stages(frozen_stages: int, num_stages: int) -> None:
    """``frozen_stages`` is -1 (nothing frozen) up to ``num_stages``."""
    if not -1 <= frozen_stages <= num_stages:
        raise ValueError(f'frozen_stages must be in [-1, {num_stages}], got '
                         f'{frozen_stages}.')


def fsla_settings(fsla_cfg: Optional[dict], **defaults) -> dict:
    """Keyword arguments of the FSLA modules of a backbone.

    Args:
        fsla_cfg (dict, optional): The user's overrides.
        **defaults: What the backbone derives from its own arguments (the
            original builds FSLA with the block's qkv bias, scale and drops).

    Returns:
        dict: ``defaults`` updated by ``fsla_cfg``.
    """
    fsla_cfg = dict(fsla_cfg or {})
    fixed = {'embed_dims', 'num_heads'} & set(fsla_cfg)
    if fixed:
        raise ValueError(
            f'fsla_cfg must not set {sorted(fixed)}: FSLA uses the '
            f'width and heads of its stage.')
    return {**defaults, **fsla_cfg}


class FrozenStagesMixin:
    """``frozen_stages`` for backbones with ``patch_embed``, ``stages`` and
    an output norm ``norm{i}`` per index of ``out_indices``, as upstream:
    the patch embedding (``frozen_stages >= 0``) and the first
    ``frozen_stages`` stages stay in eval mode without gradients."""

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for param in self.patch_embed.parameters():
                param.requires_grad = False
        for i in range(self.frozen_stages):
            modules = [self.stages[i]]
            if i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
            for m in modules:
                m.eval()
                for param in m.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> nn.Module:
        """Set train mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self
