# Copyright (c) boat-mm contributors. All rights reserved.
"""Convert the published BOAT checkpoints to boat-mm classifier keys.

The published BOAT-Swin files keep their weights under ``model``, the
BOAT-CSWin files (timm's saver) under ``state_dict`` / ``state_dict_ema``.
The converters return an mmpretrain ``ImageClassifier`` state dict:
``backbone.*`` plus ``head.fc.*``.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    'boat_cswin_converter', 'boat_swin_converter', 'detect_boat_family',
    'convert_boat_checkpoint'
]

# Buffers of the originals that boat-mm recomputes.
_DROP = re.compile(r'(relative_position_index|attn_mask)$')

_CSWIN_RULES: List[Tuple[str, str]] = [
    (r'stage1_conv_embed\.0\.', 'backbone.patch_embed.projection.'),
    (r'stage1_conv_embed\.2\.', 'backbone.patch_embed.norm.'),
    (r'merge(\d)\.conv\.', 'backbone.stages.{0-1}.downsample.projection.'),
    (r'merge(\d)\.norm\.', 'backbone.stages.{0-1}.downsample.norm.'),
    (r'stage(\d)\.(\d+)\.qkv\.', 'backbone.stages.{0-1}.blocks.{1}.attn.qkv.'),
    (r'stage(\d)\.(\d+)\.proj\.',
     'backbone.stages.{0-1}.blocks.{1}.attn.proj.'),
    (r'stage(\d)\.(\d+)\.attns\.(\d)\.get_v\.',
     'backbone.stages.{0-1}.blocks.{1}.attn.branches.{2}.get_v.'),
    (r'stage(\d)\.(\d+)\.content_attn\.',
     'backbone.stages.{0-1}.blocks.{1}.fsla.'),
    (r'stage(\d)\.(\d+)\.norm1\.', 'backbone.stages.{0-1}.blocks.{1}.norm1.'),
    (r'stage(\d)\.(\d+)\.norm2\.', 'backbone.stages.{0-1}.blocks.{1}.norm2.'),
    (r'stage(\d)\.(\d+)\.norm3\.',
     'backbone.stages.{0-1}.blocks.{1}.norm_fsla.'),
    (r'stage(\d)\.(\d+)\.mlp\.fc1\.',
     'backbone.stages.{0-1}.blocks.{1}.ffn.layers.0.0.'),
    (r'stage(\d)\.(\d+)\.mlp\.fc2\.',
     'backbone.stages.{0-1}.blocks.{1}.ffn.layers.1.'),
    (r'norm\.', 'backbone.norm{last}.'),
    (r'head\.', 'head.fc.'),
]

_SWIN_RULES: List[Tuple[str, str]] = [
    (r'patch_embed\.proj\.', 'backbone.patch_embed.projection.'),
    (r'patch_embed\.norm\.', 'backbone.patch_embed.norm.'),
    (r'layers\.(\d)\.downsample\.', 'backbone.stages.{0}.downsample.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.attn\.(qkv|proj)\.',
     'backbone.stages.{0}.blocks.{1}.attn.w_msa.{2}.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.attn\.relative_position_bias_table',
     'backbone.stages.{0}.blocks.{1}.attn.w_msa.'
     'relative_position_bias_table'),
    (r'layers\.(\d)\.blocks\.(\d+)\.attnC\.',
     'backbone.stages.{0}.blocks.{1}.fsla.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.norm1\.',
     'backbone.stages.{0}.blocks.{1}.norm1.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.norm2\.',
     'backbone.stages.{0}.blocks.{1}.norm2.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.norm4\.',
     'backbone.stages.{0}.blocks.{1}.norm_fsla.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.',
     'backbone.stages.{0}.blocks.{1}.ffn.layers.0.0.'),
    (r'layers\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.',
     'backbone.stages.{0}.blocks.{1}.ffn.layers.1.'),
    (r'norm\.', 'backbone.norm{last}.'),
    (r'head\.', 'head.fc.'),
]


def _rename(key: str, rules: List[Tuple[str, str]],
            last: int) -> Optional[str]:
    for pattern, target in rules:
        m = re.match(pattern, key)
        if m is None:
            continue
        groups = m.groups()

        def fill(spec: re.Match) -> str:
            text = spec.group(1)
            if text == 'last':
                return str(last)
            if text.endswith('-1'):
                return str(int(groups[int(text[:-2])]) - 1)
            return groups[int(text)]

        return re.sub(r'\{([^}]+)\}', fill, target) + key[m.end():]
    return None


def _convert(state_dict: Mapping[str, Tensor], rules: List[Tuple[str, str]],
             last: int, family: str,
             fix: Optional[Callable[[str, Tensor], Tensor]] = None
             ) -> 'OrderedDict[str, Tensor]':
    out: 'OrderedDict[str, Tensor]' = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        if _DROP.search(key):
            continue
        new = _rename(key, rules, last)
        if new is None:
            unknown.append(key)
            continue
        out[new] = fix(new, value) if fix is not None else value
    if unknown:
        raise KeyError(f'{family} checkpoint has keys that are not part of '
                       f'the published model: {unknown[:20]}'
                       f'{" ..." if len(unknown) > 20 else ""} '
                       f'({len(unknown)} in all). Is it a BOAT {family} '
                       f'checkpoint?')
    return out


def boat_cswin_converter(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Rename a published BOAT-CSWin state dict to boat-mm keys."""
    stages = {int(m.group(1))
              for m in map(re.compile(r'stage(\d)\.').match, state_dict)
              if m}
    return _convert(state_dict, _CSWIN_RULES, max(stages, default=4) - 1,
                    'BOAT-CSWin')


def _swin_merge_order(channels: int) -> Tensor:
    """Index turning Swin's merging order into mmcv's ``nn.Unfold`` order.

    Swin concatenates the 2x2 neighbours as (0,0), (1,0), (0,1), (1,1) (row
    offset first); ``nn.Unfold`` flattens channels first, then (0,0),
    (0,1), (1,0), (1,1). ``new[:, j] = old[:, order[j]]``.
    """
    c = channels // 4
    swin_slot = {(0, 0): 0, (1, 0): 1, (0, 1): 2, (1, 1): 3}
    order = []
    for ch in range(c):
        for dy in (0, 1):
            for dx in (0, 1):
                order.append(swin_slot[(dy, dx)] * c + ch)
    return torch.tensor(order)


def _swin_fix(key: str, value: Tensor) -> Tensor:
    if '.downsample.reduction.weight' in key:
        return value[:, _swin_merge_order(value.shape[1])]
    if '.downsample.norm.' in key:
        return value[_swin_merge_order(value.shape[0])]
    return value


def boat_swin_converter(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Rename a published BOAT-Swin state dict to boat-mm keys and reorder
    the patch-merging weights for mmcv's ``PatchMerging``."""
    stages = {int(m.group(1))
              for m in map(re.compile(r'layers\.(\d)\.').match, state_dict)
              if m}
    return _convert(state_dict, _SWIN_RULES, max(stages, default=3),
                    'BOAT-Swin', _swin_fix)


def detect_boat_family(state_dict: Mapping[str, Tensor]) -> str:
    """'cswin' or 'swin', from the keys of a published checkpoint."""
    keys = list(state_dict)
    if any(k.startswith('stage1_conv_embed') for k in keys):
        return 'cswin'
    if any(k.startswith('layers.') for k in keys):
        return 'swin'
    raise KeyError('Neither BOAT-CSWin (stage1_conv_embed.*) nor BOAT-Swin '
                   f'(layers.*) keys found; first keys: {keys[:5]}.')


def convert_boat_checkpoint(checkpoint: Dict, use_ema: bool = False
                            ) -> Tuple[str, 'OrderedDict[str, Tensor]']:
    """Pick the weights of a published checkpoint file and convert them.

    Args:
        checkpoint (dict): The loaded file.
        use_ema (bool): Use ``state_dict_ema`` (BOAT-CSWin files).

    Returns:
        tuple[str, OrderedDict]: Family ('swin' or 'cswin') and weights.
    """
    if use_ema:
        if 'state_dict_ema' not in checkpoint:
            raise KeyError('--ema given but the file has no state_dict_ema; '
                           f'its top-level keys: {sorted(checkpoint)}.')
        weights = checkpoint['state_dict_ema']
    else:
        for key in ('model', 'state_dict'):
            if key in checkpoint:
                weights = checkpoint[key]
                break
        else:
            weights = checkpoint
    # Strip a DataParallel prefix if the saver kept one.
    weights = {
        (k[len('module.'):] if k.startswith('module.') else k): v
        for k, v in weights.items()
    }
    family = detect_boat_family(weights)
    convert = boat_cswin_converter if family == 'cswin' \
        else boat_swin_converter
    return family, convert(weights)
