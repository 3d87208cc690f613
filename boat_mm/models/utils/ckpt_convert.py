# Copyright (c) boat-mm contributors. All rights reserved.
"""Convert the published BOAT checkpoints to boat-mm classifier keys.

The published BOAT-Swin files keep their weights under ``model``, the
BOAT-CSWin files (timm's saver) under ``state_dict`` / ``state_dict_ema``.
The converters take those weights and return an mmpretrain
``ImageClassifier`` state dict (``backbone.*`` plus ``head.fc.*``) for
:class:`BOATSwin` / :class:`BOATCSWin` with ``out_indices=(3, )``. Derived
buffers (``relative_position_index``, ``attn_mask``) are dropped. Keys that
are not part of the published model raise a ``KeyError`` listing them.

``tools/model_converters/boat2mm.py`` is the command-line front end.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor

__all__ = [
    'boat_cswin_converter', 'boat_swin_converter', 'detect_boat_family',
    'convert_boat_checkpoint', 'detect_boat_cswin_arch',
    'detect_boat_swin_arch', 'pick_boat_weights', 'swin_merge_order'
]

# Buffers of the originals that boat-mm recomputes.
_DROP = re.compile(r'(relative_position_index|attn_mask)$')


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f' ... ({len(keys)} in all)' if len(keys) > limit else ''
    return f'{keys[:limit]}{more}'


def _rename(key: str, rules: List[Tuple[str, str]],
            last: int) -> Optional[str]:
    """Apply the first matching rule; None if no rule matches.

    In a target, ``{i}`` is the rule's group ``i``, ``{i-1}`` that group
    minus one (1-based stage numbers), ``{last}`` the last stage index.
    """
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
    """Rename every key by ``rules`` (dropping derived buffers), then let
    ``fix(new_key, value)`` reorder values. Unmatched keys raise."""
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
                       f'the published model: {_listing(unknown)}. Is it a '
                       f'BOAT {family} checkpoint?')
    return out


# ---------------------------------------------------------------------------
# BOAT-Swin
# ---------------------------------------------------------------------------

_SWIN_BLOCK = r'layers\.(\d+)\.blocks\.(\d+)\.'
_SWIN_RULES: List[Tuple[str, str]] = [
    (r'patch_embed\.proj\.', 'backbone.patch_embed.projection.'),
    (r'patch_embed\.norm\.', 'backbone.patch_embed.norm.'),
    (r'layers\.(\d+)\.downsample\.(reduction|norm)\.',
     'backbone.stages.{0}.downsample.{1}.'),
    (_SWIN_BLOCK + r'attn\.(qkv|proj)\.',
     'backbone.stages.{0}.blocks.{1}.attn.w_msa.{2}.'),
    (_SWIN_BLOCK + r'attn\.relative_position_bias_table$',
     'backbone.stages.{0}.blocks.{1}.attn.w_msa.'
     'relative_position_bias_table'),
    (_SWIN_BLOCK + r'attnC\.(qkv|proj|get_v)\.',
     'backbone.stages.{0}.blocks.{1}.fsla.{2}.'),
    (_SWIN_BLOCK + r'norm(1|2)\.', 'backbone.stages.{0}.blocks.{1}.norm{2}.'),
    (_SWIN_BLOCK + r'norm4\.', 'backbone.stages.{0}.blocks.{1}.norm_fsla.'),
    (_SWIN_BLOCK + r'mlp\.fc1\.',
     'backbone.stages.{0}.blocks.{1}.ffn.layers.0.0.'),
    (_SWIN_BLOCK + r'mlp\.fc2\.',
     'backbone.stages.{0}.blocks.{1}.ffn.layers.1.'),
    (r'norm\.', 'backbone.norm{last}.'),
    (r'head\.', 'head.fc.'),
]


def swin_merge_order(channels: int) -> Tensor:
    """Index turning Swin's patch-merging order into mmcv's.

    Swin's ``PatchMerging`` concatenates the 2x2 neighbours as ``x0`` (row
    0, col 0), ``x1`` (1, 0), ``x2`` (0, 1), ``x3`` (1, 1), each with all
    ``C`` channels: feature ``slot * C + c``. mmcv's ``PatchMerging`` uses
    ``nn.Unfold``, which puts channels first and then the kernel positions
    in raster order (0, 0), (0, 1), (1, 0), (1, 1): feature
    ``c * 4 + 2 * row + col``. So ``mmcv_w[..., j] = swin_w[..., order[j]]``
    for the reduction weight's columns and the norm's weight and bias.

    Args:
        channels (int): The merged width ``4 * C``.

    Returns:
        Tensor: ``(4 * C, )`` int64 index.
    """
    if channels % 4:
        raise ValueError(f'Patch merging width {channels} is not 4 * C.')
    c = channels // 4
    swin_slot = torch.tensor([0, 2, 1, 3])  # raster (row, col) -> Swin slot
    ch = torch.arange(c)
    return (swin_slot[None, :] * c + ch[:, None]).reshape(-1)


def _swin_fix(key: str, value: Tensor) -> Tensor:
    if key.endswith('.downsample.reduction.weight'):
        return value[:, swin_merge_order(value.shape[1])]
    if '.downsample.norm.' in key:
        return value[swin_merge_order(value.shape[0])]
    return value


def _swin_depths(state_dict: Mapping[str, Tensor]) -> Dict[int, int]:
    """Number of blocks of each stage found in a BOAT-Swin state dict."""
    depths: Dict[int, int] = {}
    for key in state_dict:
        m = re.match(_SWIN_BLOCK, key)
        if m:
            s, i = int(m.group(1)), int(m.group(2))
            depths[s] = max(depths.get(s, 0), i + 1)
    return depths


def _swin_expected_keys(state_dict: Mapping[str, Tensor]) -> Set[str]:
    """The keys a published BOAT-Swin (or plain Swin) classifier with the
    stage/block counts found in ``state_dict`` must have."""
    depths = _swin_depths(state_dict)
    if not depths:
        raise KeyError('No BOAT-Swin blocks (layers.{s}.blocks.{i}.*) found.')
    num_layers = max(depths) + 1
    # FSLA keys anywhere -> a BOAT model; none -> plain Swin.
    with_fsla = any('.attnC.' in k for k in state_dict)
    wb = ('weight', 'bias')
    keys = {f'patch_embed.{m}.{p}' for m in ('proj', 'norm') for p in wb}
    keys |= {f'norm.{p}' for p in wb} | {f'head.{p}' for p in wb}
    for s in range(num_layers):
        last = s == num_layers - 1
        for i in range(depths.get(s, 0)):
            pre = f'layers.{s}.blocks.{i}.'
            keys.add(pre + 'attn.relative_position_bias_table')
            names = ['norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1',
                     'mlp.fc2']
            if with_fsla and not last and i % 2 == 1:
                names += ['norm4', 'attnC.qkv', 'attnC.proj', 'attnC.get_v']
            keys |= {f'{pre}{n}.{p}' for n in names for p in wb}
        if not last:
            keys |= {f'layers.{s}.downsample.norm.{p}' for p in wb}
            keys.add(f'layers.{s}.downsample.reduction.weight')
    return keys


# (embed_dims, depths, num_heads) -> BOATSwin arch name.
_SWIN_ARCHS = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): 'tiny',
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): 'small',
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): 'base',
}


def detect_boat_swin_arch(state_dict: Mapping[str, Tensor]) -> dict:
    """Describe a BOAT-Swin (or plain Swin) checkpoint from its keys/shapes.

    Args:
        state_dict (Mapping[str, Tensor]): Weights in the original layout.

    Returns:
        dict: ``arch`` ('tiny', 'small', 'base', or None for other
        settings), ``embed_dims``, ``depths``, ``num_heads`` (from the
        position-bias tables), ``window_size``, ``patch_size``,
        ``in_channels``, ``with_fsla`` and ``num_classes`` (None without a
        head).
    """
    stem = 'patch_embed.proj.weight'
    if stem not in state_dict:
        raise KeyError(f'Not a BOAT-Swin checkpoint: {stem!r} is missing; '
                       f'first keys: {list(state_dict)[:5]}.')
    depths = _swin_depths(state_dict)
    num_layers = max(depths, default=-1) + 1
    if not num_layers or len(depths) != num_layers:
        raise KeyError(f'BOAT-Swin checkpoint without blocks for some '
                       f'stage: blocks per stage {depths}.')
    heads, window = [], 0
    for s in range(num_layers):
        table = state_dict.get(
            f'layers.{s}.blocks.0.attn.relative_position_bias_table')
        if table is None:
            raise KeyError(f'BOAT-Swin checkpoint without the position-bias '
                           f'table of stage {s}.')
        heads.append(int(table.shape[1]))
        # (2 * window - 1) ** 2 rows.
        window = (int(round(table.shape[0]**0.5)) + 1) // 2
    embed = state_dict[stem]
    head = state_dict.get('head.weight')
    key = (int(embed.shape[0]), tuple(depths[s] for s in range(num_layers)),
           tuple(heads))
    return dict(
        arch=_SWIN_ARCHS.get(key),
        embed_dims=key[0],
        depths=key[1],
        num_heads=key[2],
        window_size=window,
        patch_size=int(embed.shape[-1]),
        in_channels=int(embed.shape[1]),
        with_fsla=any('.attnC.' in k for k in state_dict),
        num_classes=None if head is None else int(head.shape[0]))


def boat_swin_converter(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Convert a published BOAT-Swin state dict to boat-mm keys.

    Renames to :class:`BOATSwin` + ``LinearClsHead`` keys, reorders the
    patch-merging weights for mmcv's ``PatchMerging`` (see
    :func:`swin_merge_order`) and drops derived buffers. Plain Swin
    checkpoints (no ``attnC``) convert too, for ``with_fsla=False``.

    Args:
        state_dict (Mapping[str, Tensor]): The ``model`` entry of the file.

    Returns:
        OrderedDict[str, Tensor]: ``backbone.*`` and ``head.fc.*`` weights.

    Raises:
        KeyError: Keys that the published model does not have, or keys it
            has that are missing, listed.
    """
    params = {k for k in state_dict if not _DROP.search(k)}
    expected = _swin_expected_keys(state_dict)
    unknown, missing = params - expected, expected - params
    if unknown or missing:
        raise KeyError(
            'Not a complete BOAT-Swin checkpoint: '
            f'unknown keys {_listing(unknown)}; missing keys '
            f'{_listing(missing)}.')
    num_layers = 1 + max(
        int(m.group(1)) for m in map(re.compile(r'layers\.(\d+)\.').match,
                                     state_dict) if m)
    return _convert(state_dict, _SWIN_RULES, num_layers - 1, 'BOAT-Swin',
                    _swin_fix)


# ---------------------------------------------------------------------------
# Both families
# ---------------------------------------------------------------------------


def detect_boat_family(state_dict: Mapping[str, Tensor]) -> str:
    """'cswin' or 'swin', from the keys of a published checkpoint."""
    keys = list(state_dict)
    if any(k.startswith('stage1_conv_embed') for k in keys):
        return 'cswin'
    if any(k.startswith('layers.') for k in keys):
        return 'swin'
    raise KeyError('Neither BOAT-CSWin (stage1_conv_embed.*) nor BOAT-Swin '
                   f'(layers.*) keys found; first keys: {keys[:5]}.')


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


def convert_boat_checkpoint(checkpoint: Dict, use_ema: bool = False
                            ) -> Tuple[str, 'OrderedDict[str, Tensor]']:
    """Pick the weights of a published checkpoint file and convert them.

    Args:
        checkpoint (dict): The loaded file (see :func:`pick_boat_weights`).
        use_ema (bool): Use ``state_dict_ema`` (BOAT-CSWin files).

    Returns:
        tuple[str, OrderedDict]: Family ('swin' or 'cswin') and weights.
    """
    _, weights = pick_boat_weights(checkpoint, use_ema)
    family = detect_boat_family(weights)
    convert = boat_cswin_converter if family == 'cswin' \
        else boat_swin_converter
    return family, convert(weights)


# ===========================================================================
# BOAT-CSWin converter section: written and maintained by the BOAT-CSWin
# backbone work (boat_mm/models/backbones/boat_cswin.py). Keep
# `boat_cswin_converter(state_dict) -> OrderedDict` below this marker; the
# helpers above (`_convert`, `_rename`, `_DROP`, `_listing`) may be used.
# ===========================================================================


def _cswin_strip_module(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Drop a DataParallel ``module.`` prefix, if every key has one."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return OrderedDict(
            (k[len('module.'):], v) for k, v in state_dict.items())
    return OrderedDict(state_dict)


# Suffixes of one original CSWin block and their boat-mm names
# (``BOATCSWinBlock``); ``attns.1`` exists in all but the last stage and
# the FSLA keys (``content_attn``, ``norm3``) in the even-indexed blocks.
_CSWIN_BLOCK_KEYS = OrderedDict([
    ('norm1', 'norm1'),
    ('qkv', 'attn.qkv'),
    ('attns.0.get_v', 'attn.branches.0.get_v'),
    ('attns.1.get_v', 'attn.branches.1.get_v'),
    ('proj', 'attn.proj'),
    ('norm3', 'norm_fsla'),
    ('content_attn.qkv', 'fsla.qkv'),
    ('content_attn.proj', 'fsla.proj'),
    ('content_attn.get_v', 'fsla.get_v'),
    ('norm2', 'norm2'),
    ('mlp.fc1', 'ffn.layers.0.0'),
    ('mlp.fc2', 'ffn.layers.1'),
])
_CSWIN_FSLA_KEYS = ('norm3', 'content_attn.qkv', 'content_attn.proj',
                    'content_attn.get_v')
# (embed_dims, depths) -> BOATCSWin arch name; heads are not in the weights.
_CSWIN_ARCHS = {
    (64, (1, 2, 21, 1)): 'tiny',
    (64, (2, 4, 32, 2)): 'small',
    (96, (2, 4, 32, 2)): 'base',
}
_CSWIN_BLOCK_RE = re.compile(r'stage(\d+)\.(\d+)\.')


def detect_boat_cswin_arch(state_dict: Mapping[str, Tensor]) -> dict:
    """Describe a BOAT-CSWin (or plain CSWin) checkpoint from its keys.

    Args:
        state_dict (Mapping[str, Tensor]): Weights in the original layout
            (``stage1_conv_embed.*``, ``stage{k}.{i}.*``, ``merge{k}.*``).

    Returns:
        dict: ``arch`` ('tiny', 'small', 'base' or None when the widths
        and depths match none of them: then ``num_heads`` must come from
        elsewhere), ``embed_dims``, ``depths``, ``with_fsla`` (whether the
        file has FSLA weights, i.e. BOAT-CSWin rather than CSWin) and
        ``num_classes`` (None without a head).
    """
    state_dict = _cswin_strip_module(state_dict)
    stem = 'stage1_conv_embed.0.weight'
    if stem not in state_dict:
        raise KeyError(f'Not a BOAT-CSWin checkpoint: {stem!r} is missing; '
                       f'first keys: {list(state_dict)[:5]}.')
    blocks: Dict[int, int] = {}
    for key in state_dict:
        m = _CSWIN_BLOCK_RE.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    num_stages = max(blocks, default=0)
    depths = tuple(blocks.get(k, 0) for k in range(1, num_stages + 1))
    if not depths or 0 in depths:
        raise KeyError(f'BOAT-CSWin checkpoint without blocks for some '
                       f'stage: blocks per stage {depths}.')
    embed_dims = int(state_dict[stem].shape[0])
    head = state_dict.get('head.weight')
    return dict(
        arch=_CSWIN_ARCHS.get((embed_dims, depths)),
        embed_dims=embed_dims,
        depths=depths,
        with_fsla=any('.content_attn.' in k for k in state_dict),
        num_classes=None if head is None else int(head.shape[0]))


def _cswin_key_map(depths: Tuple[int, ...], with_fsla: bool,
                   with_head: bool) -> 'OrderedDict[str, str]':
    """Original -> boat-mm key for every parameter of the architecture."""
    names = OrderedDict()

    def add(src: str, dst: str) -> None:
        for p in ('weight', 'bias'):
            names[f'{src}.{p}'] = f'{dst}.{p}'

    add('stage1_conv_embed.0', 'backbone.patch_embed.projection')
    add('stage1_conv_embed.2', 'backbone.patch_embed.norm')
    last = len(depths) - 1
    for s, depth in enumerate(depths):
        if s > 0:
            # merge{s} sits before stage s+1: our stages[s].downsample.
            add(f'merge{s}.conv', f'backbone.stages.{s}.downsample.projection')
            add(f'merge{s}.norm', f'backbone.stages.{s}.downsample.norm')
        for i in range(depth):
            for src, dst in _CSWIN_BLOCK_KEYS.items():
                if src == 'attns.1.get_v' and s == last:
                    continue  # one whole-map branch in the last stage
                if src in _CSWIN_FSLA_KEYS and not (with_fsla and i % 2 == 0):
                    continue
                add(f'stage{s + 1}.{i}.{src}',
                    f'backbone.stages.{s}.blocks.{i}.{dst}')
    add('norm', f'backbone.norm{last}')
    if with_head:
        add('head', 'head.fc')
    return names


def boat_cswin_converter(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Convert a published BOAT-CSWin (or CSWin) state dict to boat-mm.

    Renames the weights to an mmpretrain ``ImageClassifier`` with a
    ``BOATCSWin`` backbone: ``stage1_conv_embed.{0,2}`` -> the stem
    ``patch_embed.{projection,norm}``, ``merge{k}`` -> ``stages.{k}.
    downsample``, ``stage{k}.{i}`` -> ``stages.{k-1}.blocks.{i}`` (``qkv``,
    ``proj``, ``attns.{j}.get_v`` -> ``attn.*``; ``content_attn`` ->
    ``fsla``; ``norm3`` -> ``norm_fsla``; ``mlp.fc1/fc2`` ->
    ``ffn.layers.0.0/1``), ``norm`` -> ``norm{last}`` (all under
    ``backbone.``) and ``head`` -> ``head.fc``. No tensor changes.

    Args:
        state_dict (Mapping[str, Tensor]): Original weights, e.g. the
            ``state_dict`` or ``state_dict_ema`` of a published file.

    Returns:
        OrderedDict[str, Tensor]: Classifier weights.

    Raises:
        KeyError: Listing the unknown and the missing keys when the file
            does not have exactly the original architecture's parameters.
    """
    state_dict = _cswin_strip_module(state_dict)
    info = detect_boat_cswin_arch(state_dict)
    names = _cswin_key_map(info['depths'], info['with_fsla'],
                           info['num_classes'] is not None)
    unknown = [k for k in state_dict if k not in names]
    missing = [k for k in names if k not in state_dict]
    if unknown or missing:
        raise KeyError(
            f'Not a complete BOAT-CSWin checkpoint (detected embed_dims '
            f'{info["embed_dims"]}, depths {info["depths"]}, FSLA '
            f'{info["with_fsla"]}): unknown keys {_listing(unknown)}, '
            f'missing keys {_listing(missing)}.')
    return OrderedDict((dst, state_dict[src]) for src, dst in names.items())
