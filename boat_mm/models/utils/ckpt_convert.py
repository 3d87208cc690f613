# Copyright (c) boat-mm contributors. All rights reserved.
"""Machinery to convert the published BOAT checkpoints to boat-mm keys.

What a published file looks like is a fact of each family and lives in its
backbone file (``published_key_map``, ``detect_published`` of
:class:`~boat_mm.models.backbones.BaseBOATBackbone`); this module holds
what the families share: picking the weights out of a file, counting
blocks, renaming by a key map with checks, and listing keys in errors.

``tools/model_converters/boat2mm.py`` is the command-line front end.
"""
import re
from collections import OrderedDict
from typing import (Callable, Dict, Iterable, Mapping, Optional, Sequence,
                    Tuple)

from torch import Tensor

__all__ = [
    'add_module_keys', 'blocks_per_stage', 'convert_by_key_map',
    'key_listing', 'pick_boat_weights', 'strip_module_prefix'
]


def key_listing(keys: Iterable[str], limit: int = 20) -> str:
    """The first ``limit`` sorted keys, and how many there are in all."""
    keys = sorted(keys)
    more = f' ... ({len(keys)} in all)' if len(keys) > limit else ''
    return f'{keys[:limit]}{more}'


def strip_module_prefix(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Drop a DataParallel ``module.`` prefix, if every key has one."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return OrderedDict(
            (k[len('module.'):], v) for k, v in state_dict.items())
    return OrderedDict(state_dict)


def pick_boat_weights(checkpoint: Dict, use_ema: bool = False
                      ) -> Tuple[str, 'OrderedDict[str, Tensor]']:
    """The weights of a published checkpoint file.

    Args:
        checkpoint (dict): The loaded file: weights under ``model``
            (BOAT-Swin), ``state_dict`` / ``state_dict_ema`` (BOAT-CSWin),
            or a bare state dict.
        use_ema (bool): Use ``state_dict_ema`` (BOAT-CSWin files).

    Returns:
        tuple[str, OrderedDict]: The entry used ('' for a bare state dict)
        and its weights, without a DataParallel ``module.`` prefix.
    """
    if use_ema:
        if 'state_dict_ema' not in checkpoint:
            raise KeyError('EMA weights asked for but the file has no '
                           'state_dict_ema; its top-level keys: '
                           f'{sorted(map(str, checkpoint))}.')
        key = 'state_dict_ema'
    else:
        key = next((k for k in ('model', 'state_dict') if k in checkpoint),
                   '')
    weights = checkpoint[key] if key else checkpoint
    return key, OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in weights.items())


def blocks_per_stage(keys: Iterable[str], pattern: str) -> Dict[int, int]:
    """Number of blocks of each stage, from keys matching ``pattern``.

    Args:
        keys (Iterable[str]): State-dict keys.
        pattern (str): Regex whose groups 1 and 2 are the stage and block
            index, e.g. ``r'layers\\.(\\d+)\\.blocks\\.(\\d+)\\.'``.

    Returns:
        dict[int, int]: Stage index (as written) -> blocks found.
    """
    depths: Dict[int, int] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            s, i = int(m.group(1)), int(m.group(2))
            depths[s] = max(depths.get(s, 0), i + 1)
    return depths


def add_module_keys(names: 'OrderedDict[str, str]',
                    src: str,
                    dst: str,
                    params: Sequence[str] = ('weight', 'bias')) -> None:
    """Map ``{src}.{p}`` to ``{dst}.{p}`` for each parameter name ``p``."""
    for p in params:
        names[f'{src}.{p}'] = f'{dst}.{p}'


def convert_by_key_map(
        state_dict: Mapping[str, Tensor],
        key_map: Mapping[str, str],
        name: str,
        fix: Optional[Callable[[str, Tensor], Tensor]] = None,
        drop: Tuple[str, ...] = (),
        detail: str = '') -> 'OrderedDict[str, Tensor]':
    """Rename every key of ``state_dict`` by ``key_map``.

    Args:
        state_dict (Mapping[str, Tensor]): Weights in the published layout.
        key_map (Mapping[str, str]): Every published key of the detected
            architecture -> its boat-mm key.
        name (str): The family's name, for errors (e.g. ``'BOAT-Swin'``).
        fix (Callable, optional): ``fix(new_key, value)`` returns the value
            to store, for tensors laid out differently.
        drop (tuple[str]): Suffixes of derived buffers that are skipped.
        detail (str): What was detected, for errors.

    Returns:
        OrderedDict[str, Tensor]: boat-mm keys, in the order of the file.

    Raises:
        KeyError: Listing the unknown and the missing keys when the file
            does not have exactly the published architecture's parameters.
    """
    params = [k for k in state_dict if not (drop and k.endswith(drop))]
    unknown = [k for k in params if k not in key_map]
    missing = [k for k in key_map if k not in state_dict]
    if unknown or missing:
        raise KeyError(
            f'Not a complete {name} checkpoint{detail}: unknown keys '
            f'{key_listing(unknown)}; missing keys {key_listing(missing)}.')
    out: 'OrderedDict[str, Tensor]' = OrderedDict()
    for key in params:
        new = key_map[key]
        out[new] = state_dict[key] if fix is None else fix(
            new, state_dict[key])
    return out
