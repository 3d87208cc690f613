# Copyright (c) boat-mm contributors. All rights reserved.
"""Check that the parts of a model config agree on their widths, before
the model is built: the channels its BOAT backbone outputs and its necks
and heads take (every tool), and the classes of a classifier's head and
of its one-hot targets (``tools/train.py``). Either mismatch builds, and
fails in the first iteration with a shape error that names no key.

A config that changes the backbone's ``arch`` (``--cfg-options
model.backbone.arch=base``) keeps the widths its ``_base_`` gave the
consumers of the outputs; the model builds, and the first iteration fails
in a conv (``expected input[...] to have 64 channels, but got 96``). The
backbone's class computes its output widths from the config
(:meth:`~boat_mm.models.backbones.BaseBOATBackbone.output_channels`), so
the tools compare them with the consumers they know, how these read the
outputs:

* a neck that takes every output with one width each (mmdet's ``FPN``
  and its subclasses, ``ChannelMapper``; mmseg's ``FPN``,
  ``MultiLevelNeck``): ``in_channels`` lists them;
* without a neck, mmseg's decode and auxiliary heads (``BaseDecodeHead``):
  ``in_channels`` is the width of output ``in_index`` (ints), or lists
  those of ``in_index`` (lists), whose sum counts with
  ``input_transform='resize_concat'`` (the maps are concatenated);
* mmpretrain's linear classifier heads after ``GlobalAveragePooling``:
  ``in_channels`` is the width of the last output.

Any other backbone, neck or head is left to its own checks.

:func:`check_preprocessor_classes` compares ``model.head.num_classes``
with the ``num_classes`` of the data preprocessor that makes the one-hot
targets Mixup/CutMix mix (mmpretrain's).
"""
import importlib
from typing import Any, List, Optional, Sequence, Tuple, Union

__all__ = [
    'boat_backbone', 'check_consumer_widths', 'check_preprocessor_classes',
    'heads_at'
]

#: Necks whose ``in_channels`` lists the width of every output, in order
#: (``package.Class``; their subclasses too).
LIST_NECKS = frozenset(
    {'mmdet.FPN', 'mmdet.ChannelMapper', 'mmseg.FPN', 'mmseg.MultiLevelNeck'})
#: mmseg's base of the decode heads, whose inputs ``in_index`` selects.
DECODE_HEAD = 'mmseg.BaseDecodeHead'
#: mmseg's default ``in_index`` (``BaseDecodeHead.__init__``): the last.
DEFAULT_IN_INDEX = -1
#: The pooling neck of mmpretrain's classifiers: a vector per output.
POOLING = 'mmpretrain.GlobalAveragePooling'
#: mmpretrain's heads whose ``in_channels`` is the width of the last
#: pooled output (their ``pre_logits`` takes ``feats[-1]``).
LAST_OUTPUT_HEADS = frozenset({
    'mmpretrain.LinearClsHead', 'mmpretrain.StackedLinearClsHead',
    'mmpretrain.MultiLabelLinearClsHead', 'mmpretrain.ArcFaceClsHead'
})

# (key, its value, the value that fits or None, why) of each consumer
# that does not fit.
_Mismatch = Tuple[str, Any, Optional[Union[int, List[int]]], str]


def _registry(scope: Optional[str]) -> Any:
    """The ``MODELS`` registry a model of ``default_scope`` is built
    from (MMEngine's root one without a scope).

    Args:
        scope (str, optional): The config's ``default_scope``.

    Returns:
        Registry: The registry.
    """
    return importlib.import_module(
        f'{scope}.registry' if scope else 'mmengine.registry').MODELS


def _lineage(registry: Any, cfg: Any) -> Tuple[Optional[type], frozenset]:
    """The class a module config builds, and ``package.Class`` of it and
    of its bases.

    Args:
        registry (Registry): The scope's ``MODELS``.
        cfg (Any): A module config, ``dict(type=...)``.

    Returns:
        tuple[type | None, frozenset[str]]: The class (None when the
        config names none the registry has) and its lineage.
    """
    kind = cfg.get('type') if isinstance(cfg, dict) else None
    cls = kind if isinstance(kind, type) else (
        registry.get(kind) if isinstance(kind, str) else None)
    if not isinstance(cls, type):
        return None, frozenset()
    return cls, frozenset(f'{k.__module__.split(".")[0]}.{k.__name__}'
                          for k in cls.__mro__)


def _ints(value: Any) -> bool:
    """Whether ``value`` is a list or tuple of ints (not bools)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _neck_mismatch(key: str, neck: dict,
                   widths: Sequence[int]) -> Optional[_Mismatch]:
    """A neck of :data:`LIST_NECKS` that does not take ``widths``.

    Args:
        key (str): The neck's key, e.g. ``'model.neck'``.
        neck (dict): Its config.
        widths (Sequence[int]): The backbone's output widths.

    Returns:
        tuple | None: The mismatch, or None.
    """
    channels = neck.get('in_channels')
    if not _ints(channels) or list(channels) == list(widths):
        return None
    return (f'{key}.in_channels', list(channels), list(widths),
            'one width per output of the backbone')


def _decode_head_mismatch(key: str, head: dict,
                          widths: Sequence[int]) -> Optional[_Mismatch]:
    """An mmseg decode head whose ``in_channels`` are not the widths of
    the outputs its ``in_index`` selects, as ``BaseDecodeHead`` reads them.

    Args:
        key (str): The head's key, e.g. ``'model.decode_head'``.
        head (dict): Its config.
        widths (Sequence[int]): The backbone's output widths.

    Returns:
        tuple | None: The mismatch, or None (also for settings that
        ``BaseDecodeHead`` itself refuses).
    """
    channels = head.get('in_channels')
    index = head.get('in_index', DEFAULT_IN_INDEX)
    transform = head.get('input_transform')
    if _is_int(channels) and _is_int(index) and transform is None:
        indices = [index]
    elif _ints(channels) and _ints(index) and len(channels) == len(index):
        indices = list(index)
    else:
        return None
    n = len(widths)
    if not all(-n <= i < n for i in indices):
        return (f'{key}.in_index', index, None,
                f'it selects outputs of the {n}: use indices in '
                f'[{-n}, {n - 1}]')
    fits = [widths[i] for i in indices]
    if _is_int(channels):
        return None if channels == fits[0] else (
            f'{key}.in_channels', channels, fits[0],
            f'the width of output {index}, its in_index')
    # Concatenated maps: only the sum of the widths counts.
    ok = sum(channels) == sum(fits) if transform == 'resize_concat' \
        else list(channels) == fits
    how = 'concatenated: their sum counts' if transform == 'resize_concat' \
        else 'one width each'
    return None if ok else (f'{key}.in_channels', list(channels), fits,
                            f'outputs {list(index)}, its in_index, {how}')


def _pooled_head_mismatch(head: Any, registry: Any,
                          widths: Sequence[int]) -> Optional[_Mismatch]:
    """An mmpretrain head of :data:`LAST_OUTPUT_HEADS` (after
    ``GlobalAveragePooling``) whose ``in_channels`` is not the width of the
    last output.

    Args:
        head (Any): The config's ``model.head``.
        registry (Registry): The scope's ``MODELS``.
        widths (Sequence[int]): The backbone's output widths.

    Returns:
        tuple | None: The mismatch, or None.
    """
    channels = head.get('in_channels') if isinstance(head, dict) else None
    if not _is_int(channels) or channels == widths[-1] or not (
            _lineage(registry, head)[1] & LAST_OUTPUT_HEADS):
        return None
    return ('model.head.in_channels', channels, widths[-1],
            'the width of the last output, pooled')


def heads_at(model: dict, name: str) -> List[Tuple[str, Any]]:
    """``(key, config)`` of the head(s) at ``name`` of a model config
    (dotted: ``'roi_head.bbox_head'``), a dict or a list of them (mmseg's
    cascades, mmdet's cascade ROI heads); keys as ``--cfg-options`` takes
    them.

    Args:
        model (dict): The config's ``model``.
        name (str): The head's place in it.

    Returns:
        list[tuple[str, Any]]: ``('model.NAME[.INDEX]', config)`` each.
    """
    heads: Any = model
    for part in name.split('.'):
        heads = heads.get(part) if isinstance(heads, dict) else None
    if isinstance(heads, (list, tuple)):
        return [(f'model.{name}.{i}', h) for i, h in enumerate(heads)]
    return [(f'model.{name}', heads)] if heads is not None else []


def _mismatches(model: dict, registry: Any,
                widths: Sequence[int]) -> List[_Mismatch]:
    """The consumers of the backbone's outputs that do not take
    ``widths``.

    Args:
        model (dict): The config's ``model``.
        registry (Registry): The scope's ``MODELS``.
        widths (Sequence[int]): The backbone's output widths.

    Returns:
        list[tuple]: The mismatches, in the order of the config's keys.
    """
    neck = model.get('neck')
    found: List[Optional[_Mismatch]] = []
    if neck is not None:
        # mmdet's necks may be a chain: the first takes the outputs.
        chain = isinstance(neck, (list, tuple)) and bool(neck)
        key, first = ('model.neck.0', neck[0]) if chain else ('model.neck',
                                                              neck)
        lineage = _lineage(registry, first)[1]
        if lineage & LIST_NECKS:
            found.append(_neck_mismatch(key, first, widths))
        elif POOLING in lineage:
            found.append(
                _pooled_head_mismatch(model.get('head'), registry, widths))
    else:
        # Without a neck, mmseg's heads take the backbone's outputs.
        for name in ('decode_head', 'auxiliary_head'):
            for key, head in heads_at(model, name):
                if DECODE_HEAD in _lineage(registry, head)[1]:
                    found.append(_decode_head_mismatch(key, head, widths))
    return [m for m in found if m is not None]


def _option(key: str, value: Any) -> str:
    """``KEY=VALUE`` as ``--cfg-options`` takes it (lists quoted, without
    spaces)."""
    if isinstance(value, list):
        return f'{key}="[{",".join(map(str, value))}]"'
    return f'{key}={value}'


def boat_backbone(cfg: Any) -> Optional[Tuple[type, dict, Any]]:
    """The BOAT backbone of a config's model, if it has one: the
    ``model.backbone`` of a classifier, segmentor, detector or SimMIM
    model whose type the scope's registry resolves to a subclass of
    :class:`~boat_mm.models.backbones.BaseBOATBackbone`.

    Args:
        cfg (mmengine.config.Config): The complete config.

    Returns:
        tuple | None: ``(class, arguments without type and _scope_, MODELS
        registry of the scope)``, or None for any other backbone, or none.
    """
    model = cfg.get('model')
    backbone = model.get('backbone') if isinstance(model, dict) else None
    if not isinstance(backbone, dict):
        return None
    try:
        registry = _registry(cfg.get('default_scope'))
    except ImportError:  # check_scope_installed names what to install
        return None
    from boat_mm.models.backbones import BaseBOATBackbone
    cls = _lineage(registry, backbone)[0]
    if cls is None or not issubclass(cls, BaseBOATBackbone):
        return None
    # MMEngine's registry takes type and the _scope_ it notes out.
    args = {
        k: v
        for k, v in backbone.items() if k != 'type' and not k.startswith('_')
    }
    return cls, args, registry


def check_consumer_widths(cfg: Any) -> None:
    """Refuse a config whose necks or heads do not take the channels that
    its BOAT backbone outputs (see the module's docstring for which).

    Acts only on a backbone registered by boat_mm whose ``arch`` and
    ``out_indices`` parse; anything else is left to the build.

    Args:
        cfg (mmengine.config.Config): The complete config (with
            ``--cfg-options`` merged).

    Raises:
        UsageError: Naming each key that does not fit, its value, the
            backbone's widths per stage of ``out_indices``, and the
            ``--cfg-options`` that fix them.
    """
    from .cli import UsageError
    found_backbone = boat_backbone(cfg)
    if found_backbone is None:
        return
    cls, args, registry = found_backbone
    model = cfg['model']
    backbone = model['backbone']
    try:
        stages = cls.output_channels(**args)
    except (TypeError, ValueError):  # the backbone says what is wrong
        return
    widths = list(stages.values())
    found = _mismatches(model, registry, widths)
    if not found:
        return
    what = '; '.join(f'{key}={value!r} ({why})' if fix is
                     None else f'{key}={value!r} should be {fix!r} ({why})'
                     for key, value, fix, why in found)
    fixes = ' '.join(
        _option(key, fix) for key, _, fix, _ in found if fix is not None)
    arch = backbone.get('arch')
    named = f' (arch={arch!r})' if isinstance(arch, str) else ''
    advice = (f'; pass `--cfg-options {fixes}` (or set them in the config)'
              if fixes else '')
    raise UsageError(
        f'the necks and heads do not take the channels that the backbone '
        f'{cls.__name__}{named} outputs: {widths} at stages '
        f'{tuple(stages)} (model.backbone.out_indices): {what}{advice}; '
        f'else the model builds and fails in its first forward')


def check_preprocessor_classes(cfg: Any) -> None:
    """Refuse a classifier whose data preprocessor counts other classes
    than its head: e.g. a child config that sets
    ``model.head.num_classes=3`` keeps mmpretrain's ImageNet
    ``data_preprocessor.num_classes=1000``, the width of the one-hot
    targets of Mixup/CutMix (``model.train_cfg.augments``), and the loss
    fails at the first iteration (``LabelSmoothLoss requires output and
    target to be same shape``).

    MMEngine's runner gives the model the top-level ``data_preprocessor``
    when ``model`` has none; a head or preprocessor without
    ``num_classes``, or a preprocessor that makes no one-hot targets, is
    left alone.

    Args:
        cfg (mmengine.config.Config): The merged config.
    """
    from .cli import UsageError
    model = cfg.get('model')
    if not isinstance(model, dict):
        return
    head = model.get('head')
    key, preprocessor = 'model.data_preprocessor', model.get(
        'data_preprocessor')
    if preprocessor is None:  # as MMEngine's Runner.__init__ does
        key, preprocessor = 'data_preprocessor', cfg.get('data_preprocessor')
    if not (isinstance(head, dict) and isinstance(preprocessor, dict)):
        return
    classes, width = head.get('num_classes'), preprocessor.get('num_classes')
    if classes is None or width is None or classes == width:
        return
    # mmpretrain's ImageClassifier gives model.train_cfg to its
    # preprocessor as batch_augments, which turn to_onehot on; without
    # one-hot targets the preprocessor's num_classes is unused (mmpretrain's
    # resnet50_8xb128_coslr-90e_in21k.py has 21843 and 21842).
    if not (preprocessor.get('to_onehot')
            or preprocessor.get('batch_augments', model.get('train_cfg'))):
        return
    fix = (f'data_preprocessor = dict(num_classes={classes})'
           if key == 'data_preprocessor' else
           f'model = dict(data_preprocessor=dict(num_classes={classes}))')
    raise UsageError(
        f'model.head.num_classes={classes} but {key}.num_classes={width} '
        f'(the width of the one-hot targets that Mixup/CutMix mix; the loss '
        f'would refuse the shapes at the first iteration): set `{fix}` in '
        f'your config, or pass `--cfg-options {key}.num_classes={classes}`')
