# Copyright (c) boat-mm contributors. All rights reserved.
"""Argument helpers and stage freezing shared by the BOAT backbones."""
import difflib
import inspect
import math
import numbers
import os.path as osp
import re
import warnings
from typing import (Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple,
                    Union)

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from torch import Tensor

__all__ = [
    'parse_arch', 'stage_widths', 'check_pretrained_file', 'training_run',
    'parse_out_indices', 'check_frozen_stages', 'fsla_settings',
    'FrozenStagesMixin', 'pretrained_init_cfg', 'unexpected_arguments_error',
    'check_qk_scale', 'check_int', 'check_number', 'check_bool', 'check_rate',
    'check_tokens', 'check_norm_cfg', 'UPSTREAM_SWIN_ARGS'
]

#: The arguments of the upstream Swin backbones (mmpretrain's, mmseg's and
#: mmdet's ``SwinTransformer``), to tell them apart from plain typos.
UPSTREAM_SWIN_ARGS = frozenset({
    'arch', 'img_size', 'pretrain_img_size', 'in_channels', 'embed_dims',
    'patch_size', 'window_size', 'mlp_ratio', 'depths', 'num_heads', 'strides',
    'out_indices', 'out_after_downsample', 'qkv_bias', 'qk_scale',
    'patch_norm', 'drop_rate', 'attn_drop_rate', 'drop_path_rate',
    'use_abs_pos_embed', 'interpolate_mode', 'act_cfg', 'norm_cfg', 'with_cp',
    'pretrained', 'convert_weights', 'frozen_stages', 'norm_eval',
    'pad_small_map', 'stage_cfgs', 'patch_cfg', 'init_cfg'
})


def check_int(value: int, name: str, owner: str, minimum: int = 1) -> int:
    """``value`` is an int (not a bool) of at least ``minimum``.

    Args:
        value (int): The argument.
        name (str): Its name, for the message.
        owner (str): The class it is given to, for the message.
        minimum (int): The smallest allowed value. Defaults to 1.

    Returns:
        int: ``value`` as a Python int.
    """
    # numbers.Integral admits numpy ints; bool is refused (True == 1
    # would build a model silently).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{owner}: {name} must be an int >= {minimum}, got '
                        f'{value!r} ({type(value).__name__}).')
    if value < minimum:
        raise ValueError(
            f'{owner}: {name} must be an int >= {minimum}, got {value}.')
    return int(value)


def check_number(value: float, name: str, owner: str) -> float:
    """``value`` is a positive finite real number (not a bool).

    Args:
        value (float): The argument.
        name (str): Its name, for the message.
        owner (str): The class it is given to, for the message.

    Returns:
        float: ``value`` as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{owner}: {name} must be a positive number, got '
                        f'{value!r} ({type(value).__name__}).')
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f'{owner}: {name} must be a positive number, got {value}.')
    return float(value)


def check_rate(value: float, name: str, owner: str) -> float:
    """``value`` is a probability in ``[0, 1]``.

    Args:
        value (float): The argument.
        name (str): Its name, for the message.
        owner (str): The class it is given to, for the message.

    Returns:
        float: ``value`` as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{owner}: {name} must be a float in [0, 1], got '
                        f'{value!r} ({type(value).__name__}).')
    if not 0 <= value <= 1:
        raise ValueError(f'{owner}: {name} must be in [0, 1] (a '
                         f'probability), got {value}.')
    return float(value)


def check_tokens(x: Tensor, hw_shape: Sequence[int], embed_dims: int,
                 owner: str) -> None:
    """``x`` is ``(B, N, embed_dims)`` tokens of a ``hw_shape`` map, as the
    attention modules take them (raster order).

    Args:
        x (Tensor): The module's input.
        hw_shape (Sequence[int]): ``(H, W)``.
        embed_dims (int): The channels the module was built for.
        owner (str): The module, as the error names it.
    """
    if x.dim() != 3:
        raise ValueError(
            f'{owner} expects tokens of shape (B, N, C), got a {x.dim()}-d '
            f'tensor of shape {tuple(x.shape)}; flatten the feature map '
            f'with x.flatten(2).transpose(1, 2).')
    if x.shape[-1] != embed_dims:
        raise ValueError(
            f'{owner} built for {embed_dims} channels got {x.shape[-1]} '
            f'channels (input shape {tuple(x.shape)}).')
    if not isinstance(hw_shape, (tuple, list, torch.Size)):
        # A tensor or array of the sizes: its tolist() gives the ints.
        fix = ('pass tuple(hw_shape.tolist())' if hasattr(hw_shape, 'tolist')
               else f'pass e.g. ({x.shape[1]}, 1) for a sequence')
        raise TypeError(
            f'{owner}: hw_shape must be the (H, W) of the tokens\' map as '
            f'a tuple of ints, got {hw_shape!r}; {fix}.')
    if len(hw_shape) != 2:
        raise ValueError(
            f'{owner}: hw_shape must be the two sizes (H, W) of the tokens\' '
            f'map, got {len(hw_shape)}: {tuple(hw_shape)}.')
    if hw_shape[0] * hw_shape[1] != x.shape[1]:
        raise ValueError(
            f'hw_shape {tuple(hw_shape)} does not match the number of '
            f'tokens N={x.shape[1]}: need H * W == N, tokens in raster '
            f'order.')


def check_bool(value: bool, name: str, owner: str) -> bool:
    """Check that ``value`` is a bool.

    A string such as ``'False'`` is truthy and would silently mean True.

    Args:
        value (bool): The argument.
        name (str): Its name, for the error.
        owner (str): The class it is given to, for the error.

    Returns:
        bool: ``value``.
    """
    if not isinstance(value, bool):
        raise TypeError(f'{owner}: {name} must be True or False, got '
                        f'{value!r} ({type(value).__name__}).')
    return value


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
                f'{name}: unknown arch {arch!r}; choose one of '
                f'{sorted(set(arch_zoo))} or pass a dict with keys '
                f'{sorted(essential_keys)}.')
        return dict(arch_zoo[key])
    if isinstance(arch, dict):
        missing = essential_keys - set(arch)
        if missing:
            raise ValueError(f'{name}: the custom arch misses keys '
                             f'{sorted(missing)}; it needs '
                             f'{sorted(essential_keys)}.')
        return dict(arch)
    raise TypeError(f'{name}: arch must be a name of '
                    f'{sorted(set(arch_zoo))} or a dict with keys '
                    f'{sorted(essential_keys)}, got {arch!r} '
                    f'({type(arch).__name__}).')


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
    if isinstance(embed_dims, bool):  # True would mean widths 1, 2, 4, ...
        widths = []
    elif isinstance(embed_dims, numbers.Integral):
        widths = [int(embed_dims) * 2**i for i in range(num_stages)]
    elif isinstance(embed_dims, (list, tuple)) and all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool)
            for w in embed_dims):
        widths = [int(w) for w in embed_dims]
    else:  # a float would be truncated or fail deep inside nn.Linear
        widths = []
    if len(widths) != num_stages or min(widths, default=0) < 1:
        raise ValueError(
            f'{name} arch: embed_dims must be a positive int or one '
            f'positive width per stage ({num_stages}), got {embed_dims}.')
    return widths


# What MMEngine's CheckpointHook writes (epoch_N, iter_N, best_*), in the
# folder of its run.
_RUN_CHECKPOINT = re.compile(
    r'(?:(?:.*/)?([^/]+)/)?(?:best_[^/]*_)?(?:epoch|iter)_\d+\.pth')


def training_run(checkpoint: str) -> Optional[str]:
    """The run that wrote ``checkpoint``, if it is a file of MMEngine's
    ``CheckpointHook``.

    Args:
        checkpoint (str): A checkpoint path.

    Returns:
        str, optional: The name of the run's folder (``''`` where the path
        names none), or None for a file of another kind.
    """
    run = _RUN_CHECKPOINT.fullmatch(checkpoint)
    if run is None:
        return None
    return run[1] if run[1] not in (None, '.', '..') else ''


def check_pretrained_file(init_cfg: Union[dict, List[dict], None],
                          name: str) -> None:
    """Fail early, with the fix, when a local pretrained file is missing.

    Args:
        init_cfg (dict | list[dict], optional): The backbone's
            ``init_cfg``; its ``Pretrained`` entries are checked.
        name (str): The backbone's name, for the error.
    """
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    for cfg in cfgs:
        if not isinstance(cfg, dict) or cfg.get('type') != 'Pretrained':
            continue
        ckpt = str(cfg.get('checkpoint', ''))
        # MMEngine's local loader expands '~' too.
        if '://' in ckpt or osp.isfile(osp.expanduser(ckpt)):
            continue
        run = training_run(ckpt)
        if run is not None:
            # A training run's output, e.g. of a SimMIM pre-training that
            # the fine-tuning config starts from: the converter is no fix.
            how = (f'It is the checkpoint of a training run: train '
                   f'{run or "that run"} first (`python tools/train.py '
                   f'CONFIG` writes work_dirs/CONFIG_NAME/), point '
                   f'init_cfg.checkpoint to an existing file (`--cfg-options '
                   f'model.backbone.init_cfg.checkpoint=FILE`)')
        else:
            how = (f'Convert the published BOAT weights with `python '
                   f'tools/model_converters/boat2mm.py SRC {ckpt}`, point '
                   f'init_cfg.checkpoint to an existing file')
        raise FileNotFoundError(
            f'{name}: pretrained checkpoint {ckpt!r} not found. {how}, or '
            f'set `model.backbone.init_cfg=None` to train from scratch.')


#: Checkpoint schemes of MMEngine's model zoos of CNNs (ResNet, HRNet,
#: ResNeSt, ...: ``mmengine/hub/openmmlab.json``, torchvision's models).
_CNN_ZOOS = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'modelzoo://')


def pretrained_init_cfg(pretrained: Optional[str],
                        init_cfg: Optional[Union[dict, List[dict]]],
                        name: str) -> Optional[Union[dict, List[dict]]]:
    """The ``init_cfg`` of a backbone given the deprecated ``pretrained``.

    mmseg's segmentors set ``backbone.pretrained`` from the model-level
    ``pretrained``; as mmseg's Swin, a path becomes a ``Pretrained``
    ``init_cfg`` (with a deprecation warning) and both at once is refused.

    Args:
        pretrained (str, optional): A checkpoint path or URL.
        init_cfg (dict | list[dict], optional): The backbone's ``init_cfg``.
        name (str): Backbone name, for messages.

    Returns:
        dict | list[dict] | None: The ``init_cfg`` to use.
    """
    if pretrained is None:
        return init_cfg
    if not isinstance(pretrained, str):
        raise TypeError(f'{name}: pretrained must be a str (a checkpoint '
                        f'path) or None, got {type(pretrained).__name__}.')
    if init_cfg:
        raise ValueError(
            f'{name}: pretrained={pretrained!r} and init_cfg={init_cfg!r} '
            f'cannot both be set. Drop pretrained (mmseg sets it on the '
            f'backbone from the model-level `pretrained`) or set '
            f'`init_cfg=None` on the backbone.')
    scheme = pretrained.partition('://')[0] + '://'
    if scheme in _CNN_ZOOS:
        # mmseg's ResNet / HRNet / ResNeSt bases: a download, then a
        # refusal (or, offline, a network error) far from the cause.
        raise ValueError(
            f'{name}: pretrained={pretrained!r} names CNN weights of '
            f"MMEngine's model zoo, which no BOAT backbone loads. It is the "
            f'model-level `pretrained` of a _base_ config with another '
            f'backbone (mmseg passes it to the backbone): set '
            f'`model=dict(pretrained=None)` in your config (or '
            f'`--cfg-options model.pretrained=None`), and BOAT or Swin '
            f"weights with the backbone's init_cfg.")
    # A swap that keeps a _base_ config's model-level `pretrained` (mmseg's
    # KNet Swin configs) would load that backbone's weights unnoticed.
    warnings.warn(
        f'DeprecationWarning: {name}: pretrained is deprecated, please use '
        f'"init_cfg" instead: init_cfg=dict(type=\'Pretrained\', '
        f'checkpoint={pretrained!r}), with prefix=\'backbone.\' for a '
        f'classifier checkpoint (what boat2mm.py writes). mmseg\'s '
        f'segmentors set it from the model-level `pretrained`, maybe '
        f'inherited from a _base_ config with another backbone: set '
        f'`model=dict(pretrained=None)` unless {pretrained!r} is meant.')
    return dict(type='Pretrained', checkpoint=pretrained)


#: Why some upstream Swin arguments have no place here, for the error.
_UPSTREAM_REASONS = {
    'norm_eval': ('the norms are LayerNorms (norm_cfg), which have no '
                  'running statistics to freeze; drop it'),
    'convert_weights': ('published checkpoints are converted once, by '
                        'tools/model_converters/boat2mm.py; drop it'),
}


def _guesses(unknown: Iterable[str], accepted: Sequence[str]) -> str:
    """The accepted names that misspelt ones likely mean.

    Args:
        unknown (Iterable[str]): Names not accepted.
        accepted (Sequence[str]): The accepted names.

    Returns:
        str: ``'MEANT for GIVEN, ...'``, '' if none is close.
    """
    close = [(k, difflib.get_close_matches(k, accepted, 1)) for k in unknown]
    return ', '.join(f'{m[0]} for {k}' for k, m in close if m)


def unexpected_arguments_error(name: str, unknown: Iterable[str],
                               accepted: Iterable[str]) -> TypeError:
    """The error for keyword arguments a backbone does not take.

    Args:
        name (str): The class built.
        unknown (Iterable[str]): The arguments it does not take.
        accepted (Iterable[str]): The arguments it takes.

    Returns:
        TypeError: Naming the unknown arguments, which of them upstream
        Swin backbones take, and how to drop inherited ones.
    """
    unknown = sorted(unknown)
    accepted = sorted(set(accepted))
    upstream = [k for k in unknown if k in UPSTREAM_SWIN_ARGS]
    msg = f'{name} got unexpected keyword arguments {unknown}.'
    # A misspelt argument (out_indice): name the one meant.
    guess = _guesses([k for k in unknown if k not in upstream], accepted)
    if guess:
        msg += f' Did you mean {guess}?'
    if upstream:
        msg += (f' Arguments of the upstream (mmpretrain, mmseg, mmdet) '
                f'SwinTransformer that {name} does not support: {upstream}.')
        msg += ''.join(f' {k}: {_UPSTREAM_REASONS[k]}.' for k in upstream
                       if k in _UPSTREAM_REASONS)
        arch_keys = [
            k for k in upstream if k in ('embed_dims', 'depths', 'num_heads')
        ]
        if arch_keys:
            msg += (f' Give {arch_keys} inside '
                    f'arch=dict(embed_dims=..., depths=..., num_heads=...).')
        msg += (' If an inherited (_base_) config left them in the backbone '
                'dict, add `_delete_=True` to your backbone dict to drop '
                'the inherited keys.')
    return TypeError(msg + f' {name} takes {accepted}.')


def parse_out_indices(out_indices: Union[int, Sequence[int]], num_stages: int,
                      owner: str) -> Tuple[int, ...]:
    """Sorted, de-duplicated stage indices; negative ones count from the end.

    Args:
        out_indices (int | Sequence[int]): Stages whose outputs are returned.
        num_stages (int): Number of stages of the backbone.
        owner (str): The class given it, for the errors.

    Returns:
        tuple[int]: Indices in ``[0, num_stages)``.
    """
    who = f'{owner}: '
    if isinstance(out_indices, numbers.Integral):
        out_indices = [out_indices]
    if not isinstance(out_indices, (list, tuple)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool)
            for i in out_indices):
        raise TypeError(
            f'{who}out_indices must be an int or a sequence of ints (stage '
            f'indices in [-{num_stages}, {num_stages - 1}]), e.g. '
            f'{tuple(range(num_stages))}, got {out_indices!r}.')
    if len(out_indices) == 0:
        raise ValueError(
            f'{who}out_indices must name at least one stage, e.g. '
            f'{tuple(range(num_stages))} or -1 for the last, got ().')
    parsed = []
    for i in map(int, out_indices):
        j = i + num_stages if i < 0 else i
        if not 0 <= j < num_stages:
            raise ValueError(
                f'{who}out_indices {tuple(out_indices)} must index one of '
                f'the {num_stages} stages; {i} is out of range (e.g. '
                f'out_indices={tuple(range(num_stages))}, or -1 for the '
                f'last).')
        parsed.append(j)
    return tuple(sorted(set(parsed)))


def check_frozen_stages(frozen_stages: int, num_stages: int,
                        owner: str) -> None:
    """Check that ``frozen_stages`` is -1 (nothing frozen) up to
    ``num_stages``.

    Args:
        frozen_stages (int): The argument.
        num_stages (int): Number of stages of the backbone.
        owner (str): The class given it, for the errors.
    """
    who = f'{owner}: '
    integral = isinstance(frozen_stages, numbers.Integral)
    if isinstance(frozen_stages, bool) or not integral:
        raise TypeError(f'{who}frozen_stages must be an int in [-1, '
                        f'{num_stages}] (-1: nothing frozen), got '
                        f'{frozen_stages!r}.')
    if not -1 <= frozen_stages <= num_stages:
        raise ValueError(f'{who}frozen_stages must be in [-1, {num_stages}], '
                         f'got {frozen_stages}.')


def check_heads(embed_dims: int, num_heads: int, owner: str) -> None:
    """Check that the heads split the channels evenly.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        owner (str): The class given them, for the error.
    """
    if embed_dims % num_heads != 0:
        raise ValueError(
            f'{owner}: embed_dims ({embed_dims}) must be divisible by '
            f'num_heads ({num_heads}); change one of them.')


def check_qk_scale(qk_scale: Optional[float], name: str) -> None:
    """Check that ``qk_scale`` is None or positive.

    mmpretrain's window attention reads 0 as "the default", a plain
    ``qk_scale`` as 0 (uniform attention): refuse it rather than let the
    attentions of one backbone disagree.

    Args:
        qk_scale (float, optional): The argument.
        name (str): The class it is given to, for the error.
    """
    if qk_scale is not None and (isinstance(qk_scale, bool)
                                 or not isinstance(qk_scale, numbers.Real)):
        raise TypeError(f'{name}: qk_scale must be a positive number or '
                        f'None, got {qk_scale!r}.')
    if qk_scale is not None and not qk_scale > 0:
        raise ValueError(
            f'{name}: qk_scale must be positive or None, got {qk_scale}; '
            f'use qk_scale=None for the default head_dim ** -0.5.')


def check_norm_cfg(norm_cfg: dict, name: str) -> None:
    """Check that ``norm_cfg`` builds a norm over the last dimension.

    The blocks normalise ``(B, N, C)`` tokens, each over its channels. BN
    and GN normalise dimension 1, which would fail at the first forward
    with torch's shape error, far from the config, and instance norms of
    2D maps run but mix the tokens; so build the layer once for a small
    width and run it on two tokens, together and alone.

    Args:
        norm_cfg (dict): The argument, for mmcv's ``build_norm_layer``.
        name (str): The class it is given to, for the error.
    """
    if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
        raise TypeError(f"{name}: norm_cfg must be a dict with a 'type', "
                        f"e.g. dict(type='LN'), got {norm_cfg!r}.")
    fix = "use a norm over the last dimension, e.g. dict(type='LN')"
    # The probe runs on the CPU whatever the default device: a backbone
    # built under ``torch.device('meta')`` (as for FSDP) holds no values.
    with torch.device('cpu'):
        _probe_norm(norm_cfg, name, fix)


def _probe_norm(norm_cfg: dict, name: str, fix: str) -> None:
    """Build ``norm_cfg`` and run it on two tokens; see `check_norm_cfg`."""
    try:
        # 64 channels: group norms of up to 64 groups build.
        layer = build_norm_layer(norm_cfg, 64)[1].eval()
    except KeyError as err:
        # mmcv 2.1 says "Cannot find None in registry" for a missing type.
        raise ValueError(f'{name}: norm_cfg type {norm_cfg["type"]!r} is not '
                         f'a registered norm layer (in the current registry '
                         f'scope); {fix}.') from err
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f'{name}: norm_cfg={norm_cfg!r} does not build a '
                         f'norm layer ({type(err).__name__}: {err}); '
                         f'{fix}.') from err
    # Two tokens of other values: a norm of the last dimension treats each
    # alone (instance norms of 2D maps mix them, and pass the shapes).
    tokens = torch.arange(128.).reshape(1, 2, 64)**2
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            both = layer(tokens)
            alone = layer(tokens[:, :1])
    except (RuntimeError, ValueError, AssertionError) as err:
        first = str(err).splitlines()[0] if str(err) else ''
        raise ValueError(f'{name}: norm_cfg={norm_cfg!r} cannot normalise '
                         f'the (B, N, C) tokens of the blocks '
                         f'({type(err).__name__}: {first}); {fix}.') from err
    if both.shape != tokens.shape:
        raise ValueError(f'{name}: norm_cfg={norm_cfg!r} turns (B, N, C) '
                         f'tokens of shape {tuple(tokens.shape)} into '
                         f'{tuple(both.shape)}; {fix}.')
    if not torch.allclose(both[:, :1], alone, atol=1e-5):
        raise ValueError(f'{name}: norm_cfg={norm_cfg!r} normalises the '
                         f'(B, N, C) tokens of the blocks together, not each '
                         f'over its channels; {fix}.')


def fsla_settings(fsla_cfg: Optional[dict],
                  owner: str = '',
                  **defaults: Any) -> dict:
    """Keyword arguments of the FSLA modules of a backbone.

    Args:
        fsla_cfg (dict, optional): The user's overrides.
        owner (str): The backbone class, for the errors. Defaults to ''.
        **defaults: What the backbone derives from its own arguments (the
            original builds FSLA with the block's qkv bias, scale and drops).

    Returns:
        dict: ``defaults`` updated by ``fsla_cfg``.
    """
    who = f'{owner}: ' if owner else ''
    if fsla_cfg is not None and not isinstance(fsla_cfg, dict):
        raise TypeError(f'{who}fsla_cfg must be a dict of FSLA arguments '
                        f'(e.g. dict(group_size=49)) or None, got '
                        f'{fsla_cfg!r}.')
    fsla_cfg = dict(fsla_cfg or {})
    fixed = {'embed_dims', 'num_heads'} & set(fsla_cfg)
    if fixed:
        raise ValueError(
            f'{who}fsla_cfg must not set {sorted(fixed)}: FSLA uses the '
            f'width and heads of its stage.')
    from .fsla import FeatureSpaceLocalAttention
    accepted = sorted(
        set(inspect.signature(FeatureSpaceLocalAttention).parameters) -
        {'embed_dims', 'num_heads'})
    unknown = sorted(set(fsla_cfg) - set(accepted))
    if unknown:
        guess = _guesses(unknown, accepted)
        raise TypeError(
            f'{who}fsla_cfg has keys that FeatureSpaceLocalAttention '
            f'does not take: {unknown}' +
            (f' (did you mean {guess}?)' if guess else '') +
            ('; fsla_cfg holds its arguments, not a module config: drop '
             "'type'" if 'type' in unknown else '') + f'. It takes '
            f'{accepted}.')
    return {**defaults, **fsla_cfg}


class FrozenStagesMixin:
    """``frozen_stages`` for backbones with ``patch_embed``, ``stages`` and
    an output norm ``norm{i}`` per index of ``out_indices``, as upstream:
    the stem (``stem_modules``, when ``frozen_stages >= 0``) and the first
    ``frozen_stages`` stages stay in eval mode without gradients."""
    #: The stem's modules, frozen with ``frozen_stages >= 0``; a dropout
    #: after the stem belongs here (as in mmseg's Swin).
    stem_modules: Tuple[str, ...] = ('patch_embed', )

    def _freeze_stages(self) -> None:
        """Put the frozen stem and stages in eval mode, without grads."""
        if self.frozen_stages >= 0:
            for name in self.stem_modules:
                stem = getattr(self, name)
                stem.eval()
                for param in stem.parameters():
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
        """Set train mode, keeping frozen stages in eval mode.

        Args:
            mode (bool): Train mode (True) or eval mode. Defaults to True.

        Returns:
            nn.Module: ``self``.
        """
        super().train(mode)
        self._freeze_stages()
        return self
