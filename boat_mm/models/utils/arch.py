# Copyright (c) boat-mm contributors. All rights reserved.
"""Argument helpers shared by the BOAT backbones."""
import os.path as osp
from typing import Dict, Optional, Set, Union

__all__ = ['parse_arch', 'check_pretrained_file']


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


def check_pretrained_file(init_cfg: Optional[dict], name: str) -> None:
    """Fail early, with the fix, when a local pretrained file is missing."""
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    for cfg in cfgs:
        if not isinstance(cfg, dict) or cfg.get('type') != 'Pretrained':
            continue
        ckpt = str(cfg.get('checkpoint', ''))
        if '://' in ckpt or osp.isfile(ckpt):
            continue
        raise FileNotFoundError(
            f'{name}: pretrained checkpoint {ckpt!r} not found. Convert the '
            f'published BOAT weights with `python '
            f'tools/model_converters/boat2mm.py SRC {ckpt}`, point '
            f'init_cfg.checkpoint to an existing file, or set '
            f'`model.backbone.init_cfg=None` to train from scratch.')
