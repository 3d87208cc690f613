# Copyright (c) boat-mm contributors. All rights reserved.
"""Machinery to convert the published BOAT checkpoints to boat-mm keys.

What a published file looks like is a fact of each family: a
:class:`PublishedLayout` subclass in its backbone file, next to the
backbone class, the way timm keeps ``checkpoint_filter_fn`` beside its
model. This module holds what the layouts share: the conversion itself
(a key map with checks, value fixes), picking the weights out of a file,
counting blocks and listing keys in errors.

``tools/model_converters/boat2mm.py`` (converter), ``verify_boat.py``
(verifier) and ``tools/analysis_tools/check_fsla_parity.py`` consume the
layouts through the backbones' ``published`` attribute.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from torch import Tensor

__all__ = [
    'PublishedLayout', 'add_module_keys', 'blocks_per_stage',
    'convert_by_key_map', 'key_listing', 'pick_boat_weights',
    'strip_module_prefix'
]


def key_listing(keys: Iterable[str], limit: int = 20) -> str:
    """List keys for an error message, at most ``limit`` of them.

    Args:
        keys (Iterable[str]): The keys.
        limit (int): How many to list. Defaults to 20.

    Returns:
        str: The first ``limit`` sorted keys, and how many there are in all
        when that is more.
    """
    keys = sorted(keys)
    more = f' ... ({len(keys)} in all)' if len(keys) > limit else ''
    return f'{keys[:limit]}{more}'


#: Entries of a published file that may hold the weights, in the order
#: they are looked for (BOAT-Swin's saver: model; timm's, BOAT-CSWin's:
#: state_dict / state_dict_ema).
WEIGHT_ENTRIES = ('model', 'state_dict', 'state_dict_ema')


def strip_module_prefix(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Drop a DataParallel ``module.`` prefix, if every key has one.

    Args:
        state_dict (Mapping[str, Tensor]): Weights.

    Returns:
        OrderedDict[str, Tensor]: The weights, without the prefix.
    """
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return OrderedDict(
            (k[len('module.'):], v) for k, v in state_dict.items())
    return OrderedDict(state_dict)


def pick_boat_weights(
        checkpoint: Dict,
        use_ema: bool = False) -> Tuple[str, 'OrderedDict[str, Tensor]']:
    """The weights of a published checkpoint file.

    Args:
        checkpoint (dict): The loaded file: weights under ``model``
            (BOAT-Swin), ``state_dict`` / ``state_dict_ema`` (BOAT-CSWin),
            or a bare state dict. A file with ``state_dict_ema`` alone (as
            some CSWin releases) gives those.
        use_ema (bool): Use ``state_dict_ema`` (BOAT-CSWin files).

    Returns:
        tuple[str, OrderedDict]: The entry used ('' for a bare state dict)
        and its weights, without a DataParallel ``module.`` prefix (see
        :func:`strip_module_prefix`).
    """
    if use_ema:
        if 'state_dict_ema' not in checkpoint:
            raise KeyError('EMA weights asked for but the file has no '
                           'state_dict_ema; its top-level keys: '
                           f'{sorted(map(str, checkpoint))}.')
        key = 'state_dict_ema'
    else:
        key = next((k for k in WEIGHT_ENTRIES if k in checkpoint), '')
    weights = checkpoint[key] if key else checkpoint
    return key, strip_module_prefix(weights)


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


_WEIGHT_BIAS = ('weight', 'bias')


def add_module_keys(names: 'OrderedDict[str, str]',
                    src: str,
                    dst: str,
                    params: Sequence[str] = _WEIGHT_BIAS) -> None:
    """Map ``{src}.{p}`` to ``{dst}.{p}`` for each parameter name ``p``.

    Args:
        names (OrderedDict[str, str]): Published key -> boat-mm key; added
            to in place.
        src (str): The module's published name.
        dst (str): The module's boat-mm name.
        params (Sequence[str]): Its parameter names. Defaults to
            ``('weight', 'bias')``.
    """
    for p in params:
        names[f'{src}.{p}'] = f'{dst}.{p}'


def convert_by_key_map(state_dict: Mapping[str, Tensor],
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


class PublishedLayout:
    """How a family's published checkpoints are laid out.

    A family subclasses this beside its backbone class, implementing
    :meth:`detect` and :meth:`add_stage_keys` (and :meth:`fix_value` when
    tensors are laid out differently), and sets an instance as the
    backbone's ``published`` attribute.

    Args:
        backbone (type): The backbone class the layout converts to (the
            layout reads its ``arch_zoo``, ``has_fsla`` and
            ``derived_buffers``).
        name (str): The published model, e.g. ``'BOAT-Swin'``.
        marker (str): Key prefix that marks a state dict in this layout.
        stem (tuple[str, str]): Published names of the stem's projection
            and norm.
        code (tuple[str, str], optional): The model file in the public
            code (github.com/mahaoyuHKU/pytorch-boat): family folder and
            path inside it, for the parity tools. Defaults to None.
        plain_name (str, optional): The model without FSLA whose
            checkpoints the layout also reads (e.g. ``'Swin'``), for
            messages. Defaults to None.
    """

    def __init__(self,
                 backbone: type,
                 name: str,
                 marker: str,
                 stem: Tuple[str, str],
                 code: Optional[Tuple[str, str]] = None,
                 plain_name: Optional[str] = None) -> None:
        self.backbone = backbone
        self.name, self.marker, self.stem, self.code = name, marker, stem, code
        self.plain_name = plain_name

    def matches(self, state_dict: Mapping) -> bool:
        """Whether ``state_dict`` has this layout.

        Args:
            state_dict (Mapping): Weights of a checkpoint.

        Returns:
            bool: True if a key starts with ``marker`` and the stem's
            projection weight is there under its published name (a prefix
            alone, such as BOAT-Swin's ``layers.``, is shared by other
            models' files, e.g. mmseg's converted ViTs).
        """
        return (bool(self.marker) and f'{self.stem[0]}.weight' in state_dict
                and any(str(k).startswith(self.marker) for k in state_dict))

    def detect(self, state_dict: Mapping[str, Tensor]) -> dict:
        """Describe a published state dict from its keys and shapes.

        Args:
            state_dict (Mapping[str, Tensor]): Weights in this layout.

        Returns:
            dict: At least ``arch`` (a zoo name or None), ``embed_dims``
            (the width of each stage), ``depths``, ``in_channels``,
            ``with_fsla`` and ``num_classes`` (None without a head), plus
            what the family reads from the file.
        """
        raise NotImplementedError

    def backbone_cfg(self, info: dict) -> dict:
        """The backbone arguments for a published checkpoint.

        Args:
            info (dict): The checkpoint, as :meth:`detect` describes it.

        Returns:
            dict: Arguments (without ``type``) of the backbone that the
            checkpoint is for.

        Raises:
            ValueError: The file does not determine the arguments.
        """
        return dict(
            arch=info['arch'],
            in_channels=info['in_channels'],
            with_fsla=info['with_fsla'])

    def key_map(self, info: dict) -> 'OrderedDict[str, str]':
        """Map every published key of a model to its boat-mm key.

        The keys are the stem's (``stem``), each stage's
        (:meth:`add_stage_keys`), the final ``norm`` and the ``head``
        (timm's names, which both published codes use; ``info['head']``
        names another head module, e.g. ``'head.fc'`` of timm >= 0.9).

        Args:
            info (dict): The model, as :meth:`detect` describes it (its
                ``depths``, ``with_fsla``, ``num_classes`` and optional
                ``head`` are used).

        Returns:
            OrderedDict[str, str]: Published key -> key in an mmpretrain
            ``ImageClassifier`` (``backbone.*``, ``head.fc.*``).
        """
        names: 'OrderedDict[str, str]' = OrderedDict()
        proj, norm = self.stem
        add_module_keys(names, proj, 'backbone.patch_embed.projection')
        add_module_keys(names, norm, 'backbone.patch_embed.norm')
        for stage in range(len(info['depths'])):
            self.add_stage_keys(names, stage, info)
        add_module_keys(names, 'norm',
                        f'backbone.norm{len(info["depths"]) - 1}')
        if info['num_classes'] is not None:
            add_module_keys(names, info.get('head', 'head'), 'head.fc')
        return names

    def add_stage_keys(self, names: 'OrderedDict[str, str]', stage: int,
                       info: dict) -> None:
        """Add the published keys of a stage (its merging included).

        Args:
            names (OrderedDict[str, str]): Published key -> boat-mm key;
                added to in place.
            stage (int): Index of the stage, from 0.
            info (dict): The model, as :meth:`detect` describes it.
        """
        raise NotImplementedError

    def fix_value(self, key: str, value: Tensor) -> Tensor:
        """The value to store under a boat-mm key.

        Layouts whose tensors are laid out differently override this.

        Args:
            key (str): The boat-mm key.
            value (Tensor): The published tensor.

        Returns:
            Tensor: ``value`` as boat-mm stores it (here unchanged).
        """
        return value

    def convert(
            self, state_dict: Mapping[str,
                                      Tensor]) -> 'OrderedDict[str, Tensor]':
        """Convert a published state dict to classifier keys.

        Args:
            state_dict (Mapping[str, Tensor]): The weights of a published
                file (``module.`` prefixes are dropped).

        Returns:
            OrderedDict[str, Tensor]: ``backbone.*`` and ``head.fc.*``
            weights of an mmpretrain ``ImageClassifier`` with this backbone
            (``out_indices=(3, )``), derived buffers dropped.

        Raises:
            KeyError: Keys that the published model does not have, or keys
                it has that are missing, listed.
        """
        state_dict = strip_module_prefix(state_dict)
        info = self.detect(state_dict)
        detail = (f' (detected embed_dims {list(info["embed_dims"])}, '
                  f'depths {tuple(info["depths"])}, FSLA '
                  f'{info["with_fsla"]})')
        return convert_by_key_map(state_dict, self.key_map(info), self.name,
                                  self.fix_value,
                                  self.backbone.derived_buffers, detail)
