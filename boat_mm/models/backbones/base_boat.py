# Copyright (c) boat-mm contributors. All rights reserved.
"""The base of the BOAT backbones and the registry of their families.

A family (BOAT-Swin, BOAT-CSWin, ...) is one subclass of
:class:`BaseBOATBackbone` in one file. It states its own facts there (its
``arch_zoo`` with the width of every stage, where FSLA sits, its stem and
stages, and the layout of its published checkpoints as a
:class:`~boat_mm.models.utils.ckpt_convert.PublishedLayout` beside the
class) and inherits the rest. Defining the subclass with a ``family`` name
registers it: :func:`boat_families` lists the families for the tools
(converter, verifier, visualiser, benchmarks) and the shared tests, which
hold no per-family tables.
"""
import inspect
import logging
import numbers
from collections import OrderedDict
from copy import deepcopy
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Type, Union)

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import FFN
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from ...utils.published import CONVERTER
from ..utils import FeatureSpaceLocalAttention
from ..utils.arch import (FrozenStagesMixin, check_bool, check_frozen_stages,
                          check_int, check_norm_cfg, check_number,
                          check_pretrained_file, check_qk_scale, check_rate,
                          fsla_settings, parse_arch, parse_out_indices,
                          pretrained_init_cfg, stage_widths,
                          unexpected_arguments_error)
from ..utils.ckpt_convert import (WEIGHT_ENTRIES, PublishedLayout,
                                  blocks_per_stage, key_listing,
                                  pick_boat_weights, strip_module_prefix)

__all__ = [
    'BaseBOATBackbone', 'BaseBOATBlock', 'CheckpointMismatchError',
    'boat_families', 'convert_boat_checkpoint', 'detect_boat_family',
    'find_published', 'plain_checkpoint_name'
]

_FAMILIES: Dict[str, Type['BaseBOATBackbone']] = {}


class CheckpointMismatchError(ValueError):
    """A checkpoint fits too few of a BOAT backbone's weights (another
    layout or model, or no key under a ``Pretrained`` prefix); the message
    says what the file holds and the fix. The tools report it in one
    line.

    Args:
        message (str): What the file holds and, unless ``advice`` gives
            it, the fix.
        advice (str): The fix for a file that a setting inherited from a
            ``_base_`` config may have named, after ``message``. A caller
            that knows which setting named the file replaces it with its
            own (see :meth:`BaseBOATBackbone.init_weights`).
            Defaults to ''.
    """

    def __init__(self, message: str, advice: str = '') -> None:
        super().__init__(message + advice)
        self.message = message
        self.advice = advice


def boat_families() -> Tuple[Type['BaseBOATBackbone'], ...]:
    """The BOAT backbone families, in the order they were defined.

    Returns:
        tuple[type]: The registered :class:`BaseBOATBackbone` subclasses.
    """
    return tuple(_FAMILIES.values())


def _published_family(
        state_dict: Mapping) -> Optional[Type['BaseBOATBackbone']]:
    """The family whose published layout ``state_dict`` has, or None."""
    for cls in boat_families():
        if cls.published is not None and cls.published.matches(state_dict):
            return cls
    return None


def _in_boat_mm_layout(state_dict: Mapping) -> bool:
    """Whether the keys are those of a boat-mm backbone (mmcv's
    ``patch_embed.projection`` and ``stages``), maybe under ``backbone.``."""
    keys = {
        k[len('backbone.'):] if k.startswith('backbone.') else k
        for k in map(str, state_dict)
    }
    return 'patch_embed.projection.weight' in keys and any(
        k.startswith('stages.') for k in keys)


def detect_boat_family(
        state_dict: Mapping[str, Tensor]) -> Type['BaseBOATBackbone']:
    """The family whose published layout ``state_dict`` has.

    Args:
        state_dict (Mapping[str, Tensor]): Weights of a published BOAT
            checkpoint.

    Returns:
        type: The :class:`BaseBOATBackbone` subclass of that family.

    Raises:
        KeyError: No family recognises the keys (the message lists what
            each family looks for, or says that the weights are boat-mm's
            already).
    """
    cls = _published_family(state_dict)
    if cls is None and _in_boat_mm_layout(state_dict):
        if any(str(k).startswith('backbone.') for k in state_dict):
            how = ('load_from=FILE, init_cfg=dict(type=\'Pretrained\', '
                   'checkpoint=FILE, prefix=\'backbone.\') or '
                   'mmpretrain.get_model(NAME, pretrained=FILE)')
        else:  # a backbone alone, e.g. written by mmseg's swin2mmseg.py
            how = ('it holds a backbone alone, so '
                   'init_cfg=dict(type=\'Pretrained\', checkpoint=FILE) '
                   'with no prefix')
        raise KeyError(
            f'The weights are already in boat-mm\'s layout (mmpretrain\'s '
            f'and mmseg\'s names; first keys: {list(state_dict)[:3]}), as '
            f'boat2mm.py writes and tools/train.py saves: no conversion '
            f'needed. Load the file directly: {how}.')
    if cls is None:
        looked = ', '.join(f'{c.published.name} ({c.published.marker}* and '
                           f'{c.published.stem[0]}.weight)'
                           for c in boat_families() if c.published is not None)
        raise KeyError(f'None of the published BOAT layouts found: '
                       f'{looked}; first keys: {list(state_dict)[:5]}.')
    return cls


def convert_boat_checkpoint(
    checkpoint: Dict,
    use_ema: bool = False
) -> Tuple[Type['BaseBOATBackbone'], 'OrderedDict[str, Tensor]']:
    """Pick the weights of a published checkpoint file and convert them.

    Args:
        checkpoint (dict): The loaded file (see
            :func:`~boat_mm.models.utils.ckpt_convert.pick_boat_weights`).
        use_ema (bool): Use ``state_dict_ema`` (BOAT-CSWin files).

    Returns:
        tuple[type, OrderedDict]: The family (backbone class) and the
        weights of an mmpretrain ``ImageClassifier`` (``backbone.*`` and
        ``head.fc.*``).
    """
    _, weights = pick_boat_weights(checkpoint, use_ema)
    family = detect_boat_family(weights)
    return family, family.published.convert(weights)


def find_published(obj: Any) -> Optional[Tuple[type, str, dict]]:
    """Where ``obj``, a loaded file, holds weights in a family's published
    layout.

    Args:
        obj (Any): The file's object: a state dict, or a dict holding one
            under an entry of ``WEIGHT_ENTRIES``; keys may carry
            DataParallel's ``module.``.

    Returns:
        tuple | None: ``(family, entry, info)``: the backbone class, the
        entry ('' for bare weights) and what its layout's ``detect`` reads
        (``{}`` if that fails on an incomplete file); None if no family's
        layout is there.
    """
    if not isinstance(obj, Mapping):
        return None
    candidates = [('', obj)] + [
        (k, obj[k]) for k in WEIGHT_ENTRIES if isinstance(obj.get(k), Mapping)
    ]
    for key, weights in candidates:
        weights = strip_module_prefix({
            k: v
            for k, v in weights.items() if isinstance(k, str)
        })
        cls = _published_family(weights)
        if cls is None:
            continue
        try:
            info = cls.published.detect(weights)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError):
            info = {}
        return cls, key, info
    return None


def plain_checkpoint_name(family: type, info: dict) -> Optional[str]:
    """The name of the plain model (Swin, CSWin: no FSLA) whose ImageNet
    weights a file in ``family``'s published layout holds, if it does.

    Args:
        family (type): The family found by :func:`find_published`.
        info (dict): What its layout's ``detect`` read (``{}``: unknown).

    Returns:
        str | None: E.g. ``'Swin'``; None for BOAT weights or unknown.
    """
    layout = family.published
    if info and not info.get('with_fsla', True) and layout.plain_name:
        return layout.plain_name
    return None


def _describe_published(state_dict: Mapping) -> str:
    """' It is laid out like a published BOAT-X checkpoint.' or ''."""
    found = find_published(state_dict)
    if found is None:
        return ''
    layout = found[0].published
    plain = plain_checkpoint_name(found[0], found[2])
    if plain:
        # Swin / CSWin ImageNet weights: boat2mm converts them too.
        return (f' It is laid out like a {plain} checkpoint '
                f'({layout.marker}*, no FSLA).')
    return (f' It is laid out like a published {layout.name} '
            f'checkpoint ({layout.marker}*).')


def _key_prefixes(keys: Iterable[str], own: Mapping) -> List[str]:
    """The prefixes under which ``keys`` end in names of ``own``, most
    keys first.

    Args:
        keys (Iterable[str]): A checkpoint's keys.
        own (Mapping): A module's own state dict.

    Returns:
        list[str]: Each prefix ('' for a key that is a name of ``own``).
    """
    counts: Dict[str, int] = {}
    for key in keys:
        for i in (-1, *(i for i, c in enumerate(key) if c == '.')):
            if key[i + 1:] in own:
                counts[key[:i + 1]] = counts.get(key[:i + 1], 0) + 1
    return sorted(counts, key=counts.get, reverse=True)


def _is_swin_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are those of a Swin in mmpretrain's,
    mmseg's and mmdet's layout (as BOAT-Swin's): window attention as
    ``attn.w_msa``.

    Args:
        keys (Iterable[str]): State-dict keys.

    Returns:
        bool: Whether one of them is a window attention weight.
    """
    return any('.attn.w_msa.' in str(k) for k in keys)


def _is_fsla_key(key: str) -> bool:
    """Whether a state-dict key belongs to a block's FSLA (``norm_fsla``,
    ``fsla``; see :class:`BaseBOATBlock`).

    Args:
        key (str): A state-dict key.

    Returns:
        bool: Whether it is an FSLA weight or buffer.
    """
    return '.fsla.' in key or '.norm_fsla.' in key


class BaseBOATBlock(BaseModule):
    """What the blocks of the BOAT backbones share.

    A block is a norm and an image-space attention (``norm1``, ``attn``,
    built by the family's :meth:`_build_attention`), optionally a norm and
    FSLA (``norm_fsla``, ``fsla``), then a norm and an FFN (``norm2``,
    ``ffn``, with stochastic depth on its residual), each a residual branch
    combined by the family's :meth:`_residuals`.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Heads of the image-space attention and of FSLA.
        attn_cfg (dict): The family's attention arguments, passed to
            :meth:`_build_attention`.
        with_fsla (bool): Add the FSLA residual. Defaults to False.
        fsla_cfg (dict, optional): Keyword arguments of
            :class:`FeatureSpaceLocalAttention` (without ``embed_dims`` and
            ``num_heads``). Defaults to None.
        mlp_ratio (float): FFN hidden ratio. Defaults to 4.
        qkv_bias (bool): Bias of the attention qkv. Defaults to True.
        qk_scale (float, optional): Image-space attention scale; None for
            ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout after projections and in the FFN.
            Defaults to 0.
        attn_drop_rate (float): Dropout on attention weights. Defaults to 0.
        drop_path_rate (float): Stochastic depth of this block.
            Defaults to 0.
        act_cfg (dict): FFN activation. Defaults to ``dict(type='GELU')``.
        norm_cfg (dict): Norm layers, over the last dimension of the
            ``(B, N, C)`` tokens (LN; BN and GN normalise dimension 1
            and do not fit). Defaults to ``dict(type='LN')``.
        with_cp (bool): Gradient checkpointing of the whole block.
            Defaults to False.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 attn_cfg: dict,
                 with_fsla: bool = False,
                 fsla_cfg: Optional[dict] = None,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.with_cp = with_cp
        self.with_fsla = with_fsla
        self.drop_path_cfg = dict(
            type='BOATDropPath', drop_prob=drop_path_rate)
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = self._build_attention(
            embed_dims,
            num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop_rate,
            proj_drop=drop_rate,
            **attn_cfg)
        if with_fsla:
            self.norm_fsla = build_norm_layer(norm_cfg, embed_dims)[1]
            self.fsla = FeatureSpaceLocalAttention(embed_dims, num_heads,
                                                   **(fsla_cfg or {}))
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.ffn = FFN(
            embed_dims=embed_dims,
            feedforward_channels=int(embed_dims * mlp_ratio),
            num_fcs=2,
            ffn_drop=drop_rate,
            dropout_layer=self.drop_path_cfg,
            act_cfg=act_cfg,
            add_identity=True)

    def _build_attention(self, embed_dims: int, num_heads: int,
                         **kwargs) -> nn.Module:
        """The image-space attention: ``(B, N, C)`` tokens and the map
        shape to ``(B, N, C)``. ``kwargs``: ``qkv_bias``, ``qk_scale``,
        ``attn_drop``, ``proj_drop`` and the family's ``attn_cfg``."""
        raise NotImplementedError

    def _residuals(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """The block without checkpointing."""
        raise NotImplementedError

    def forward(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward.

        Args:
            x (Tensor): ``(B, N, C)`` tokens.
            hw_shape (Sequence[int]): ``(H, W)`` of the map, ``N = H * W``.

        Returns:
            Tensor: ``(B, N, C)`` tokens.
        """
        if self.with_cp and torch.is_grad_enabled():
            # Non-reentrant: parameter grads flow even when x needs none
            # (frozen stem); the clustering is recomputed identically.
            return cp.checkpoint(
                self._residuals, x, hw_shape, use_reentrant=False)
        return self._residuals(x, hw_shape)


class BaseBOATBackbone(FrozenStagesMixin, BaseModule):
    """What the BOAT backbones share.

    A BOAT backbone is a stem (``patch_embed``) and ``stages`` whose
    ``blocks`` may hold a :class:`FeatureSpaceLocalAttention` as ``fsla``,
    stage ``i`` ``num_features[i]`` channels wide (from the arch), and an
    output norm ``norm{i}`` for each of ``out_indices``. This base parses
    the arch, validates the arguments, computes the stochastic-depth
    schedule and the keyword arguments of the blocks and of FSLA, adds the
    output norms, freezes stages, initialises the weights, runs the stages
    and loads checkpoints (dropping derived buffers, refusing a checkpoint
    that fits too few of the weights, naming the prefix it fits under, and
    logging how many weights a partial checkpoint, e.g. a Swin / CSWin one
    without FSLA, gave and which are new). A family subclass sets the class
    attributes below, builds ``patch_embed`` and ``stages`` after
    ``super().__init__`` (then calls :meth:`_add_output_norms`) and
    implements :meth:`_embed` and :meth:`has_fsla`.

    Weights are initialised as the original BOAT code does, and always so:
    truncated normal (std 0.02) Linear weights with zero biases, unit
    LayerNorms (``default_init_cfg``), then the ``init_cfg`` of this module
    on top (its ``Pretrained`` entries last, as MMEngine does), then what
    submodules initialise themselves (e.g. position-bias tables).

    Args:
        arch (str | dict): A name in ``arch_zoo`` (``'tiny'``, ``'small'``,
            ``'base'`` or ``'t'``, ``'s'``, ``'b'``) or a dict with
            ``embed_dims``, ``depths`` and ``num_heads`` (and the family's
            ``optional_keys``); ``embed_dims`` gives each stage's width,
            or one int as in mmpretrain's Swin arch dicts (see
            :func:`~boat_mm.models.utils.arch.stage_widths`).
            Defaults to ``'tiny'``.
        in_channels (int): Input channels. Defaults to 3.
        mlp_ratio (float): FFN hidden ratio. Defaults to 4.
        out_indices (Sequence[int] | int): Stages to output (negative counts
            from the end), each through its own norm (``norm{i}``), as
            mmseg's and mmdet's Swin. What follows the last of them is not
            run, and its weights (kept in the state dict) do not require
            grad. An output that the head does not read leaves its norm
            without a gradient, which DDP refuses unless
            ``find_unused_parameters=True``: a classifier, whose head reads
            the last map, takes ``(3, )`` (mmpretrain's Swin default).
            Defaults to ``(0, 1, 2, 3)``.
        qkv_bias (bool): Bias of the qkv projections. Defaults to True.
        qk_scale (float, optional): Scale of the image-space attention
            logits (and of FSLA's, unless the family's ``fsla_qk_scale`` or
            ``fsla_cfg`` sets it), positive; None for ``head_dim ** -0.5``.
            Defaults to None.
        drop_rate (float): Dropout after projections and in the FFN.
            Defaults to 0.
        attn_drop_rate (float): Dropout on attention weights. Defaults to 0.
        drop_path_rate (float): Stochastic depth, growing linearly from 0 to
            this value over all blocks. Defaults to 0.1.
        with_fsla (bool): Add FSLA where the family puts it (an arch
            without such a block is refused); False gives the plain Swin
            / CSWin (no FSLA modules at all). Defaults to True.
        fsla_cfg (dict, optional): Passed to
            :class:`FeatureSpaceLocalAttention` (``group_size``,
            ``overlap``, ``kmeans_iters``, ``kmeans_temperature``,
            ``qk_scale``, ...). Defaults to None.
        act_cfg (dict): FFN activation. Defaults to ``dict(type='GELU')``.
        norm_cfg (dict): Norm layers, over the last dimension of the
            ``(B, N, C)`` tokens (LN; BN and GN normalise dimension 1
            and are refused). Defaults to ``dict(type='LN')``.
        frozen_stages (int): Freeze (stop grad, eval mode) the stem when
            >= 0 and stages ``0 .. frozen_stages - 1`` (with their merges
            and output norms), as mmseg's Swin (mmpretrain's Swin freezes
            one stage more for the same value). A stage's merge is the one
            of its own layout: BOAT-Swin's after its blocks, so stage
            ``frozen_stages - 1``'s is frozen; BOAT-CSWin's before them, so
            the merge into stage ``frozen_stages`` trains. -1 freezes
            nothing. Defaults to -1.
        with_cp (bool): Gradient checkpointing of every block, to save
            memory at the cost of recomputation. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialisation on top of
            the default one, e.g. ``dict(type='Pretrained', checkpoint=PATH,
            prefix='backbone.')`` to load the backbone of a converted
            classifier checkpoint. Defaults to None.
        pretrained (str, optional): Deprecated, as in mmseg's Swin (whose
            segmentors set it from the model-level ``pretrained``): the same
            as ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``;
            not together with ``init_cfg``. Defaults to None.
        **kwargs: Nothing else: other arguments (e.g. upstream Swin ones
            left by a ``_base_`` config) raise a TypeError naming them.
    """
    # --- Facts each family states (see BOATSwin, BOATCSWin). ---
    #: Short name used by the tools (``--family``) and checkpoint meta.
    family: str = ''
    #: The layout of the family's published checkpoints, if any: set
    #: beside the class, in the family's file (``BOATSwin.published``).
    published: Optional[PublishedLayout] = None
    #: Which blocks hold FSLA (:meth:`has_fsla`), in words, for the error
    #: on an arch that would have none.
    fsla_blocks: str = ''
    #: Named archs; ``embed_dims`` lists the width of every stage.
    arch_zoo: Dict[str, dict] = {}
    essential_keys = frozenset({'embed_dims', 'depths', 'num_heads'})
    #: Per-stage lists an arch dict may also give.
    optional_keys = frozenset()
    #: FSLA's logit scale when ``fsla_cfg`` does not set one; None: the
    #: backbone's ``qk_scale``.
    fsla_qk_scale: Optional[float] = None
    #: Suffixes of buffers that other checkpoints carry and we derive.
    derived_buffers: Tuple[str, ...] = ()
    #: Whether a stage's ``downsample`` runs before its blocks (CSWin's
    #: merge) rather than after them (Swin's); for layer-wise depths.
    downsample_first: bool = False
    #: Tokens before the patch tokens (class tokens): none, as in
    #: mmpretrain's Swin. mmpretrain's ``vis_cam.py --vit-like`` drops
    #: this many before folding ``norm{i}``'s ``(B, H * W, C)`` output into
    #: a square map (without the attribute it assumes 1).
    num_extra_tokens: int = 0
    #: Pixels per patch token along each side of the stem's output.
    stem_stride: int = 4

    default_init_cfg = [
        dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.)
    ]
    #: Loading a checkpoint that fits (by name and shape) fewer than this
    #: share of the weights raises, naming the converter.
    min_loaded_share = 0.5
    #: Suffixes of weights that load from another shape (the family's
    #: modules resize them, e.g. Swin's position-bias tables for another
    #: window size).
    resized_on_load: Tuple[str, ...] = ()

    def __init_subclass__(cls, register: bool = True, **kwargs) -> None:
        """Register a subclass that names a ``family`` (``register=False``
        leaves it out of :func:`boat_families`, e.g. for a family that a
        test registers only while it runs), and refuse a ``has_fsla``
        that needs an instance."""
        super().__init_subclass__(**kwargs)
        # The placement is checked before any instance exists (the tools'
        # check_arguments, the arch check of __init__): an instance
        # method would fail there with a missing-argument TypeError.
        if inspect.isfunction(cls.__dict__.get('has_fsla')):
            raise TypeError(
                f'{cls.__name__}.has_fsla must be a @staticmethod (or '
                f'@classmethod) of (stage, block, num_stages): where FSLA '
                f'sits is checked before a model is built. For another '
                f'placement, define a subclass per placement (see '
                f'docs/fsla.md, "Where FSLA sits").')
        if register and cls.__dict__.get('family'):
            _FAMILIES[cls.family] = cls

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 mlp_ratio: float = 4.,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 with_fsla: bool = True,
                 fsla_cfg: Optional[dict] = None,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None,
                 pretrained: Optional[str] = None,
                 **kwargs: Any) -> None:
        settings = self._parse_arguments(
            dict(
                arch=arch,
                in_channels=in_channels,
                mlp_ratio=mlp_ratio,
                out_indices=out_indices,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate,
                drop_path_rate=drop_path_rate,
                with_fsla=with_fsla,
                fsla_cfg=fsla_cfg,
                norm_cfg=norm_cfg,
                frozen_stages=frozen_stages,
                with_cp=with_cp,
                init_cfg=init_cfg,
                pretrained=pretrained), kwargs)
        super().__init__(init_cfg=settings['init_cfg'])
        #: The deprecated ``pretrained`` given (mmseg's segmentors pass
        #: their model-level one), for the messages of :meth:`init_weights`.
        self.pretrained = pretrained
        self.arch_settings = settings['arch_settings']
        self.depths = list(self.arch_settings['depths'])
        self.num_heads = list(self.arch_settings['num_heads'])
        self.num_stages = len(self.depths)
        self.num_features = list(self.arch_settings['embed_dims'])
        #: The width of the first stage (the stem's output).
        self.embed_dims = self.num_features[0]
        self.out_indices = settings['out_indices']
        self.frozen_stages = frozen_stages
        self.in_channels = in_channels
        self.norm_cfg = norm_cfg
        self.with_fsla = with_fsla
        self.fsla_cfg = settings['fsla_cfg']
        # Up front, to name the backbone and fsla_cfg (each FSLA the
        # blocks build checks its own too). Without FSLA, the user's
        # values only: no FSLA meets the backbone's drops.
        self._check_fsla_arguments(
            self.arch_settings,
            self.fsla_cfg if with_fsla else dict(fsla_cfg or {}))
        self.block_cfg = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            fsla_cfg=self.fsla_cfg,
            act_cfg=act_cfg,
            norm_cfg=norm_cfg,
            with_cp=with_cp)
        # torch's float32 rounding, as mmpretrain's Swin; on the CPU, so
        # that a build under torch.device('meta') reads values.
        dpr = torch.linspace(
            0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.drop_path_rates: List[List[float]] = []
        for depth in self.depths:
            self.drop_path_rates.append(dpr[:depth])
            dpr = dpr[depth:]

    @classmethod
    def _init_parameters(cls) -> Dict[str, inspect.Parameter]:
        """The keyword parameters of the class and of the bases it passes
        ``**kwargs`` to, by name; a subclass's own wins (its default)."""
        params: Dict[str, inspect.Parameter] = {}
        # Up to this class: mixins after it (FrozenStagesMixin, BaseModule)
        # take no backbone argument; those before it (SimMIM's) may.
        for klass in cls.__mro__[:cls.__mro__.index(BaseBOATBackbone) + 1]:
            if '__init__' not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != 'self' and p.kind not in (
                        inspect.Parameter.VAR_KEYWORD,
                        inspect.Parameter.VAR_POSITIONAL):
                    params.setdefault(p.name, p)
        return params

    @classmethod
    def _accepted_arguments(cls) -> List[str]:
        """The keyword arguments of the class and the bases it passes
        ``**kwargs`` to."""
        return list(cls._init_parameters())

    @classmethod
    def check_arguments(cls, **kwargs: Any) -> Dict[str, Any]:
        """Validate the arguments of ``cls(**kwargs)`` without building it:
        the checks that ``__init__`` runs (the same errors), for the tools
        to run on a config before the model is built.

        Covered: unknown arguments (a misspelt one, or one of the upstream
        Swin's such as ``norm_eval``), ``arch``, ``in_channels``,
        ``mlp_ratio``, ``out_indices``, ``qkv_bias``, ``qk_scale``, the
        three drop rates, ``with_fsla`` (with an arch that has FSLA
        blocks), ``fsla_cfg`` (its keys, and its values as
        :meth:`FeatureSpaceLocalAttention.check_arguments` checks them),
        ``norm_cfg`` (a norm over the last dimension), ``frozen_stages``,
        ``with_cp``, ``pretrained`` with ``init_cfg``, and the family's own
        arguments (:meth:`_check_family_arguments`). Not covered: whether a
        ``Pretrained`` file exists (checked by ``init_weights``).

        Args:
            **kwargs: The backbone's arguments (e.g. its config without
                ``type``); defaults where not given.

        Returns:
            dict: The parsed settings (``arch_settings``, ``out_indices``,
            ``fsla_cfg``, ``init_cfg``).

        Raises:
            TypeError, ValueError: As ``cls(**kwargs)`` would.
        """
        params = cls._init_parameters()
        args = {name: p.default for name, p in params.items()}
        args.update(kwargs)
        unknown = {k: v for k, v in kwargs.items() if k not in params}
        settings = cls._parse_arguments(args, unknown)
        # In the order of __init__: the base's, then the family's.
        cls._check_fsla_arguments(
            settings['arch_settings'], settings['fsla_cfg']
            if args['with_fsla'] else dict(args['fsla_cfg'] or {}))
        cls._check_family_arguments(args)
        return settings

    @classmethod
    def _parse_arguments(cls, args: Dict[str, Any],
                         unknown: Mapping[str, Any]) -> Dict[str, Any]:
        """Validate the arguments of :class:`BaseBOATBackbone` itself
        (``__init__`` and :meth:`check_arguments` call it).

        Args:
            args (dict): Those arguments, by name (more are ignored).
            unknown (Mapping): Arguments that no ``__init__`` takes.

        Returns:
            dict: ``arch_settings``, ``out_indices``, ``fsla_cfg`` and
            ``init_cfg`` (from ``pretrained``).
        """
        name = cls.__name__
        if unknown:
            raise unexpected_arguments_error(name, unknown,
                                             cls._accepted_arguments())
        init_cfg = pretrained_init_cfg(args['pretrained'], args['init_cfg'],
                                       name)
        # Checked here rather than deep inside the layers they build.
        check_int(args['in_channels'], 'in_channels', name)
        check_number(args['mlp_ratio'], 'mlp_ratio', name)
        for flag in ('qkv_bias', 'with_fsla', 'with_cp'):
            check_bool(args[flag], flag, name)
        for rate in ('drop_rate', 'attn_drop_rate', 'drop_path_rate'):
            check_rate(args[rate], rate, name)
        arch_settings = cls._parse_arch(args['arch'])
        depths = list(arch_settings['depths'])
        cls._check_fsla_placed(args['with_fsla'], depths)
        out_indices = parse_out_indices(args['out_indices'], len(depths), name)
        check_frozen_stages(args['frozen_stages'], len(depths), name)
        check_qk_scale(args['qk_scale'], name)
        check_norm_cfg(args['norm_cfg'], name)
        # The original builds FSLA with the block's qkv_bias and drops.
        fsla_cfg = fsla_settings(
            args['fsla_cfg'],
            name,
            qk_scale=args['qk_scale']
            if cls.fsla_qk_scale is None else cls.fsla_qk_scale,
            qkv_bias=args['qkv_bias'],
            attn_drop=args['attn_drop_rate'],
            proj_drop=args['drop_rate'])
        return dict(
            arch_settings=arch_settings,
            out_indices=out_indices,
            fsla_cfg=fsla_cfg,
            init_cfg=init_cfg)

    @classmethod
    def _check_fsla_arguments(cls, arch_settings: Dict,
                              fsla_cfg: dict) -> None:
        """Validate the values of ``fsla_cfg`` (``group_size``,
        ``overlap``, ...) as the FSLA of each stage that has one takes
        them, with ``with_fsla=False`` too (a config that turns FSLA off
        keeps a wrong value for when it is turned on; then the user's
        ``fsla_cfg`` alone, as no FSLA meets the backbone's drop rates):
        :meth:`check_arguments` calls it, and ``__init__`` without FSLA;
        with it, each FSLA the blocks build checks its own.

        Args:
            arch_settings (dict): The parsed arch.
            fsla_cfg (dict): The FSLA settings to check.
        """
        depths = list(arch_settings['depths'])
        for i, depth in enumerate(depths):
            if not any(cls.has_fsla(i, j, len(depths)) for j in range(depth)):
                continue
            try:
                FeatureSpaceLocalAttention.check_arguments(
                    embed_dims=arch_settings['embed_dims'][i],
                    num_heads=arch_settings['num_heads'][i],
                    **fsla_cfg)
            except (TypeError, ValueError) as err:
                # Name what the config sets: the backbone and fsla_cfg.
                text = str(err).split(
                    f'{FeatureSpaceLocalAttention.__name__}: ', 1)[-1]
                raise type(err)(f'{cls.__name__}: fsla_cfg, in stage {i}: '
                                f'{text}') from err

    @classmethod
    def _check_family_arguments(cls, args: Dict[str, Any]) -> None:
        """Validate the arguments of the family's own ``__init__`` (its
        ``__init__`` and :meth:`check_arguments` call it); none here.

        Args:
            args (dict): The arguments, by name; read only the family's.
        """

    @classmethod
    def output_channels(cls, **kwargs: Any) -> Dict[int, int]:
        """The channels of the maps that ``cls(**kwargs)`` outputs, without
        building it: from the arch (an ``arch_zoo`` name or a dict) and
        ``out_indices``, parsed as ``__init__`` parses them, with their
        defaults where not given.

        The tools check with it, before the model is built, that the necks
        and heads of a config take these widths.

        Args:
            **kwargs: The backbone's arguments (e.g. its config without
                ``type``); only ``arch`` and ``out_indices`` are read.

        Returns:
            dict[int, int]: ``{stage: num_features[stage]}`` for each stage
            of ``out_indices``, in the order of the outputs.

        Raises:
            TypeError, ValueError: As ``__init__`` does for a bad ``arch``
                or ``out_indices``.
        """
        params = cls._init_parameters()
        arch = kwargs.get('arch', params['arch'].default)
        out_indices = kwargs.get('out_indices', params['out_indices'].default)
        widths = cls._parse_arch(arch)['embed_dims']
        return {
            i: widths[i]
            for i in parse_out_indices(out_indices, len(widths), cls.__name__)
        }

    # --- Architecture. ---

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> Dict:
        """The arch settings, validated; families add their own checks
        (a class method: :meth:`output_channels` builds nothing)."""
        name = cls.__name__
        settings = parse_arch(arch, cls.arch_zoo, set(cls.essential_keys),
                              name)
        known = cls.essential_keys | cls.optional_keys
        unknown = set(settings) - known
        if unknown:
            raise ValueError(
                f'{name}: unknown keys {sorted(unknown)} in the arch dict; it '
                f'takes {sorted(cls.essential_keys)}' +
                (f' and optionally {sorted(cls.optional_keys)}' if cls.
                 optional_keys else '') + '.')
        settings = deepcopy(settings)
        per_stage = ['num_heads'] + sorted(cls.optional_keys & set(settings))
        for key in ['depths'] + per_stage:
            entries = settings[key]
            if not isinstance(entries, (list, tuple)) or any(
                    isinstance(v, bool) or not isinstance(v, numbers.Integral)
                    or v < 1 for v in entries):
                raise ValueError(
                    f'{name} arch: {key} must be a list or tuple of one '
                    f'positive int per stage, got {entries!r}.')
        n = len(settings['depths'])
        if n < 1:
            raise ValueError(
                f'{name} arch: depths must give the blocks of at least one '
                f'stage, e.g. depths=(2, 2, 6, 2), got '
                f'{settings["depths"]!r}.')
        settings['embed_dims'] = stage_widths(settings['embed_dims'], n, name)
        if any(len(settings[k]) != n for k in per_stage):
            got = ', '.join(f'{k}={settings[k]!r}'
                            for k in ['depths'] + per_stage)
            raise ValueError(
                f'{name} arch: depths, {", ".join(per_stage)} need one entry '
                f'per stage ({n}, as depths), got {got}.')
        for i, (dims, heads) in enumerate(
                zip(settings['embed_dims'], settings['num_heads'])):
            if dims % heads:
                raise ValueError(
                    f'{name} arch: stage {i} has {dims} channels, not '
                    f'divisible by its {heads} heads.')
        return settings

    @classmethod
    def _check_fsla_placed(cls, with_fsla: bool, depths: List[int]) -> None:
        """Refuse an arch in which no block holds FSLA while ``with_fsla``
        asks for it: the model would be a plain Swin / CSWin unnoticed.

        Args:
            with_fsla (bool): The backbone's argument.
            depths (list[int]): The blocks of each stage of the arch.
        """
        if not with_fsla or any(
                cls.has_fsla(i, j, len(depths))
                for i, depth in enumerate(depths) for j in range(depth)):
            return
        name = cls.__name__
        rule = f' ({cls.fsla_blocks})' if cls.fsla_blocks else ''
        raise ValueError(
            f'{name} arch with depths {depths} has no block where '
            f'{name} puts FSLA{rule}: give it such blocks, or pass '
            f'with_fsla=False for a model without FSLA.')

    @classmethod
    def zoo_name(cls, **settings: Any) -> Optional[str]:
        """The name of the ``arch_zoo`` entry with these settings, if any.

        Args:
            **settings: Arch settings to match, e.g. ``embed_dims=96,
                depths=(2, 2, 6, 2)``.

        Returns:
            str | None: The long name (``'tiny'``), None if none matches.
        """

        def norm(v: Any) -> Any:
            return tuple(v) if isinstance(v, (list, tuple)) else v

        names = [
            name for name, zoo in cls.arch_zoo.items() if all(
                norm(zoo.get(k)) == norm(v) for k, v in settings.items())
        ]
        return max(names, key=len) if names else None

    @staticmethod
    def has_fsla(stage: int, block: int, num_stages: int) -> bool:
        """Whether a block holds FSLA.

        As in the published models, with ``with_fsla=True``. A subclass
        that moves FSLA overrides it as a static or class method: the
        tools check the placement before any model is built.

        Args:
            stage (int): Index of the stage.
            block (int): Index of the block in its stage.
            num_stages (int): Number of stages of the backbone.

        Returns:
            bool: True if the block has an FSLA residual.
        """
        raise NotImplementedError

    def _add_output_norms(self) -> None:
        """Add ``norm{i}`` for each output, then freeze what is asked.
        Families call it last in ``__init__``."""
        for i in self.out_indices:
            self.add_module(
                f'norm{i}',
                build_norm_layer(self.norm_cfg, self.num_features[i])[1])
        self._freeze_stages()
        # The forward stops at the last output stage: what follows it
        # would never get a gradient, which DDP refuses at the second
        # iteration unless find_unused_parameters=True. Kept in the model
        # (checkpoints keep their keys), not trained.
        last = self.out_indices[-1]
        unused = list(self.stages[last + 1:])
        if not self.downsample_first:
            unused.append(self.stages[last].downsample)
        for module in unused:
            if module is not None:
                module.requires_grad_(False)

    def fsla_modules(
            self) -> Dict[Tuple[int, int], FeatureSpaceLocalAttention]:
        """The FSLA modules of the backbone.

        Returns:
            dict[tuple[int, int], FeatureSpaceLocalAttention]: By
            ``(stage, block)``, in order; empty when built with
            ``with_fsla=False``.
        """
        return {
            (i, j): block.fsla
            for i, stage in enumerate(self.stages)
            for j, block in enumerate(stage.blocks) if isinstance(
                getattr(block, 'fsla', None), FeatureSpaceLocalAttention)
        }

    def get_layer_depth(self,
                        param_name: str,
                        prefix: str = '') -> Tuple[int, int]:
        """The depth of a parameter in the layer order, for mmpretrain's
        layer-wise learning-rate decay
        (``LearningRateDecayOptimWrapperConstructor``), as mmpretrain's
        Swin counts it.

        The stem is depth 0, block ``j`` of stage ``i`` is ``sum(depths[:i])
        + j + 1``, a merge takes the depth of the block just before it, and
        the output norms and whatever is not under ``prefix`` (necks,
        heads) the last depth, ``sum(depths) + 1``.

        Args:
            param_name (str): The parameter's name in the model.
            prefix (str): The backbone's prefix in the model, e.g.
                ``'backbone.'``. Defaults to ''.

        Returns:
            tuple[int, int]: The depth and the number of depths,
            ``sum(depths) + 2``.
        """
        num_layers = sum(self.depths) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        parts = param_name[len(prefix):].split('.')
        if parts[0] == 'patch_embed':
            return 0, num_layers
        if parts[0] != 'stages':
            return num_layers - 1, num_layers
        stage = int(parts[1])
        if parts[2] == 'blocks':
            return sum(self.depths[:stage]) + int(parts[3]) + 1, num_layers
        before = stage if self.downsample_first else stage + 1
        return sum(self.depths[:before]), num_layers

    # --- Forward. ---

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """The stem: ``(B, C, H, W)`` images to ``(B, N, C_0)`` tokens and
        their map shape."""
        raise NotImplementedError

    def _post_embed(self, x: Tensor) -> Tensor:
        """What follows the stem and the masking of patch tokens (BOAT-Swin's
        dropout): nothing by default."""
        return x

    def _stage_tokens(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None
    ) -> Iterator[Tuple[int, Tensor, Tuple[int, int]]]:
        """Yield ``(index, tokens, hw_shape)`` of each stage's output.

        Every stage maps ``(tokens, hw_shape)`` to ``(next_tokens,
        next_shape, out_tokens, out_shape)``: what the next stage takes and
        what this stage outputs (the same unless the stage ends with a
        merging).

        Args:
            x (Tensor): ``(B, C, H, W)`` images.
            mask (Tensor, optional): Patch tokens to replace by the mask
                token, only for the variants that have one
                (:mod:`boat_mm.models.selfsup`). Defaults to None.
        """
        if x.dim() != 4:
            raise ValueError(
                f'{type(self).__name__} expects images of shape (B, C, H, '
                f'W), got a tensor of shape {tuple(x.shape)}.')
        weight = next(self.patch_embed.parameters())
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(
                x.device.type):
            # Otherwise the stem's conv fails without naming the fix.
            fix = f'cast the images, x.to({weight.dtype})'
            if x.is_floating_point():
                fix += (f', or the model, model.to({x.dtype}) (or run a '
                        f'float32 model under torch.autocast)')
            raise TypeError(f'{type(self).__name__} has {weight.dtype} '
                            f'weights but got {x.dtype} images: {fix}.')
        x, hw_shape = self._embed(x)
        if mask is not None:
            x = self._mask_tokens(x, hw_shape, mask)
        x = self._post_embed(x)
        for i, stage in enumerate(self.stages):
            x, hw_shape, out, out_shape = stage(x, hw_shape)
            yield i, out, out_shape

    def _to_map(self, x: Tensor, i: int, hw_shape: Sequence[int]) -> Tensor:
        """Stage ``i``'s ``(B, N, C)`` tokens as a ``(B, C, H, W)`` map."""
        return x.transpose(1, 2).reshape(x.shape[0], self.num_features[i],
                                         *hw_shape).contiguous()

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        """Features of every stage before the output norms, for analysis
        and for comparing with the original implementation.

        Args:
            x (Tensor): ``(B, C, H, W)`` images.

        Returns:
            list[Tensor]: One ``(B, C_i, H_i, W_i)`` map per stage.
        """
        return [self._to_map(t, i, hw) for i, t, hw in self._stage_tokens(x)]

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Forward.

        Args:
            x (Tensor): ``(B, C, H, W)`` images, any ``H`` and ``W``.

        Returns:
            tuple[Tensor]: For each of ``out_indices``, a normed
            ``(B, C_i, H_i, W_i)`` map with ``H_i = ceil(H / 2**(i + 2))``
            (for the stride-4 stems of the published models).
        """
        return self._outputs(self._stage_tokens(x))

    def _outputs(
        self, stage_tokens: Iterator[Tuple[int, Tensor, Tuple[int, int]]]
    ) -> Tuple[Tensor, ...]:
        """The normed maps of ``out_indices`` from :meth:`_stage_tokens`,
        whose later stages are not run: the loop stops at the last."""
        outs = []
        for i, tokens, hw_shape in stage_tokens:
            if i in self.out_indices:
                tokens = getattr(self, f'norm{i}')(tokens)
                outs.append(self._to_map(tokens, i, hw_shape))
            if i == self.out_indices[-1]:
                break  # later stages are not needed
        return tuple(outs)

    # --- Weights. ---

    def init_weights(self) -> None:
        """Default initialisation, then ``init_cfg`` (pretrained last)."""
        check_pretrained_file(self.init_cfg, type(self).__name__)
        user_cfg = self.init_cfg
        extra = [] if user_cfg is None else (
            [user_cfg] if isinstance(user_cfg, dict) else list(user_cfg))
        # MMEngine applies these in order, then the children's own
        # initialisation, then the Pretrained entries.
        self.init_cfg = deepcopy(self.default_init_cfg) + extra
        try:
            self._init_with_messages()
        except CheckpointMismatchError as err:
            if self.pretrained is None:
                raise
            # The file may be one the user never named: the model-level
            # `pretrained` of a Swin _base_ config (KNet's), left by a swap.
            # Said once: the advice of `pretrained` replaces the general
            # one for a file that some inherited setting names (advice).
            raise CheckpointMismatchError(
                f'{err.message} The checkpoint came from `pretrained` '
                f'({self.pretrained!r}), which mmseg\'s segmentors set on '
                f'the backbone from the model-level `pretrained` of the '
                f'config, maybe inherited from a _base_ config with another '
                f'backbone: set `model=dict(pretrained=None)` and give '
                f'the BOAT weights as the backbone\'s init_cfg.') from err
        finally:
            self.init_cfg = user_cfg

    def _init_with_messages(self) -> None:
        """MMEngine's initialisation, a missing Pretrained prefix raised
        as a :class:`CheckpointMismatchError` that says why."""
        try:
            super().init_weights()
        except AssertionError as err:
            # MMEngine asserts that a Pretrained prefix is in the file.
            if 'is not in the pretrained model' not in str(err):
                raise
            raise self._prefix_mismatch_error() from err

    def _prefix_mismatch_error(self) -> CheckpointMismatchError:
        """The error that explains which Pretrained ``prefix`` has no key
        in its file."""
        from mmengine.runner.checkpoint import CheckpointLoader
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) \
            else [self.init_cfg]
        for cfg in cfgs:
            if not (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained'
                    and cfg.get('prefix')):
                continue
            ckpt = CheckpointLoader.load_checkpoint(
                cfg['checkpoint'], map_location='cpu')
            state = ckpt.get('state_dict', ckpt)
            prefix = cfg['prefix'] if cfg['prefix'].endswith('.') \
                else cfg['prefix'] + '.'
            if not any(str(k).startswith(prefix) for k in state):
                return self._mismatch_error(state, prefix, 0,
                                            cfg['checkpoint'])
        return CheckpointMismatchError(
            'A Pretrained init_cfg prefix is not in its checkpoint.')

    def _fitting(
            self, state_dict: Mapping, prefix: str,
            own: Mapping[str,
                         Tensor]) -> Tuple[List[str], List[str], List[str]]:
        """The weights of ``own`` that ``state_dict`` holds under
        ``prefix``.

        Args:
            state_dict (Mapping): The checkpoint's weights.
            prefix (str): The module's prefix in it.
            own (Mapping[str, Tensor]): The module's own state dict.

        Returns:
            tuple[list[str], list[str], list[str]]: The keys that load
            (same shape, or one the family resizes), those of them
            resized, and those skipped for another shape.
        """
        fits, resized, skipped = [], [], []
        for key, value in own.items():
            got = state_dict.get(prefix + key)
            if got is None:
                continue
            shape = tuple(getattr(got, 'shape', ()))
            if not self.loads_shape(key, shape, value.shape):
                skipped.append(key)
                continue
            fits.append(key)
            if shape != tuple(value.shape):
                resized.append(key)
        return fits, resized, skipped

    def loads_shape(self, key: str, shape: Sequence[int],
                    own_shape: Sequence[int]) -> bool:
        """Whether a checkpoint's weight of ``shape`` loads into this
        backbone's ``key``: the same shape, or one the family resizes on
        load (:attr:`resized_on_load`, e.g. Swin's position-bias tables of
        another window size).

        Args:
            key (str): The weight's key in this backbone's state dict.
            shape (Sequence[int]): Its shape in the checkpoint.
            own_shape (Sequence[int]): Its shape in this backbone.

        Returns:
            bool: True if it loads.
        """
        if tuple(shape) == tuple(own_shape):
            return True
        return bool(self.resized_on_load) and key.endswith(
            self.resized_on_load) and tuple(shape[1:]) == tuple(own_shape[1:])

    def _prefix_hint(self,
                     state_dict: Mapping,
                     prefix: str,
                     others: Sequence[str] = ()) -> str:
        """The prefix under which ``state_dict`` fits, as advice.

        Args:
            state_dict (Mapping): The checkpoint's weights.
            prefix (str): The prefix that did not fit.
            others (Sequence[str]): Keys of the file that the loader did
                not hand to this module (torch's loaders give a module
                only those under its prefix), matched by name.

        Returns:
            str: A sentence naming the prefix that fits, or ''.
        """
        own = self.state_dict(keep_vars=True)
        others = set(others) - set(map(str, state_dict))
        prefixes = _key_prefixes([*map(str, state_dict), *others], own)
        # Each candidate once (the found prefixes may repeat the first).
        for other in dict.fromkeys(('', 'backbone.', *prefixes)):
            if other == prefix:
                continue
            fits = len(self._fitting(state_dict, other, own)[0])
            # Keys the loader kept from this module: names only.
            named = sum(other + k in others for k in own)
            found = fits + named
            if found < self.min_loaded_share * len(own):
                continue
            fit = 'fit by name' if named > fits else 'fit'
            extra = prefix[:len(prefix) - len(other)]
            if prefix.endswith(other) and {'_orig_mod', 'module'} & set(
                    extra.split('.')):
                # The model is wrapped (torch.compile, DDP), not the file:
                # name the module the file's keys belong to.
                inner = 'model.' + extra.rstrip('.')
                return (f' Its keys {fit} {found} of them without '
                        f"{extra!r}, which this model's names carry (a "
                        f"torch.compile'd or DDP-wrapped model): load it "
                        f'into {inner}, or before wrapping.')
            pretrained = (f"init_cfg=dict(type='Pretrained', "
                          f'checkpoint=FILE, prefix={other!r})')
            if other == 'backbone.':
                return (f" Its keys under {other!r} {fit} {found} of them, as "
                        f"in a classifier, segmentor or detector checkpoint:"
                        f" load it with {pretrained} (or load_from for the "
                        f"whole model).")
            if not other:
                return (f' Its top-level keys {fit} {found} of them: it holds '
                        f"a backbone alone (as mmseg's swin2mmseg.py "
                        f"writes): load it with init_cfg=dict(type="
                        f"'Pretrained', checkpoint=FILE) and no prefix, not "
                        f"with load_from (which expects the whole model's "
                        f'keys).')
            if not other.endswith(prefix):
                return (f' Its keys under {other!r} {fit} {found} of them: '
                        f'load it with {pretrained}.')
            outer = other[:len(other) - len(prefix)]
            # torch.compile's module keeps the model as `_orig_mod`.
            compiled = (" (a torch.compile'd model's state_dict)"
                        if outer.startswith('_orig_mod.') else '')
            return (f' Its keys {fit} {found} of them with {outer!r} in '
                    f'front of the names expected here{compiled}: take '
                    f'{outer!r} off its keys, or load the backbone with '
                    f'{pretrained}.')
        return ''

    def _mismatch_error(
        self,
        state_dict: Mapping,
        prefix: str,
        found: int,
        source: str = 'the checkpoint',
        others: Sequence[str] = ()
    ) -> CheckpointMismatchError:
        """The error that explains why ``state_dict`` fits too few
        weights, and the fix (``others``: as in `_prefix_hint`)."""
        own = list(self.state_dict(keep_vars=True))
        under = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
        where = f'under {prefix!r}' if prefix else 'at its top level'
        if under:
            keys = f'its keys {where}: {key_listing(under, 5)}'
        else:
            keys = f'it has no keys {where}'
            if state_dict or others:
                listed = map(str, state_dict) if state_dict else others
                keys += f'; its keys: {key_listing(listed, 5)}'
        hint = self._prefix_hint(state_dict, prefix, others)
        named = sum(prefix + k in state_dict for k in own)
        if not hint and named >= self.min_loaded_share * len(own):
            # boat-mm's (mmpretrain's) names, other shapes: another size.
            hint = (f' Its names fit {named} of them but their shapes do '
                    f'not: it is a model of another size; build the '
                    f'backbone with the checkpoint\'s arch (embed_dims, '
                    f'depths, num_heads).')
        # Swin-layout weights that fit neither by prefix nor by shape, e.g.
        # those of a Swin detector that the model-level init_cfg of an
        # upstream config loads into a swap.
        inherited = not hint and _is_swin_layout(under)
        layout = '' if not inherited else (
            " Its keys are a Swin's (or BOAT-Swin's) in mmpretrain's, "
            "mmseg's and mmdet's layout (stages.*.attn.w_msa.*).")
        advice = '' if not inherited else (
            f' If a _base_ config with a Swin backbone gives this file (a '
            f'model-level init_cfg, pretrained or load_from), set that to '
            f'None and load {type(self).__name__} weights.')
        if not hint and not inherited:
            hint = (f'{_describe_published(state_dict)} Published BOAT '
                    f'checkpoints, and Swin / CSWin ones in the official '
                    f'or timm layout, must be converted first: '
                    f'`{CONVERTER}`, then load DST with load_from or '
                    f"init_cfg=dict(type='Pretrained', checkpoint=DST, "
                    f"prefix='backbone.').")
        return CheckpointMismatchError(
            f'{type(self).__name__}: {source} matches {found} of the '
            f'{len(own)} weights of the backbone (same name {where} and '
            f'shape); {keys}; the backbone expects {own[:4]} ... '
            f'({len(own)} in all).{hint}{layout}', advice)

    def _misplaced(self, state_dict: Mapping, prefix: str, fits: List[str],
                   unexpected_keys: List[str]) -> bool:
        """Whether a load that fits few weights is a file of another
        layout, rather than part of a model on purpose (a head, a stem):
        keys under ``prefix`` that do not load, or, with none under it,
        keys that the modules above could not place (a published file, or
        a backbone's, given to ``load_from``).

        Args:
            state_dict (Mapping): The weights under ``prefix``.
            prefix (str): The module's prefix.
            fits (list[str]): Its keys that load.
            unexpected_keys (list[str]): The loader's, so far.

        Returns:
            bool: True to refuse the load.
        """
        loads = {prefix + k for k in fits}
        # Without FSLA, a BOAT file's FSLA weights go unused, not refused.
        mine = [
            k for k in state_dict
            if k.startswith(prefix) and (self.with_fsla or not _is_fsla_key(k))
        ]
        if mine:
            return any(k not in loads for k in mine)
        return bool(unexpected_keys)

    def _depth_error(self, state_dict: Mapping,
                     prefix: str) -> Optional[CheckpointMismatchError]:
        """The error for a file of a shallower model: tiny weights into
        small have the same widths, so the file's weights load, and the
        blocks it lacks would start from scratch. A file with the stem and
        blocks is a backbone's, judged stage by stage (a stage it lacks
        has 0 blocks); a part without them (a block, a stage, the stem,
        loaded with strict=False) is not. None for a file no stage of
        which is shallower (a deeper file's extra blocks are unexpected
        keys, as in torch).

        Args:
            state_dict (Mapping): The checkpoint's weights.
            prefix (str): The module's prefix in it.

        Returns:
            CheckpointMismatchError, optional: The error to raise.
        """
        mine = [
            k[len(prefix):] for k in map(str, state_dict)
            if k.startswith(prefix)
        ]
        stem = any(k.startswith('patch_embed.') for k in mine)
        blocks = blocks_per_stage(mine, r'stages\.(\d+)\.blocks\.(\d+)\.')
        theirs = [
            blocks.get(i, 0)
            for i in range(max(self.num_stages,
                               max(blocks, default=-1) + 1))
        ]
        if not (stem and blocks) or all(n >= d
                                        for n, d in zip(theirs, self.depths)):
            return None
        # A stage without blocks is no arch to build: name none then.
        arch = f' (depths {theirs})' if all(theirs) else ''
        return CheckpointMismatchError(
            f'{type(self).__name__}: the checkpoint is of a shallower model: '
            f'its stages have {theirs} blocks, this backbone\'s '
            f'{self.depths}, whose blocks beyond the file\'s would start '
            f'from scratch (e.g. tiny weights into small). Build the '
            f'backbone with the checkpoint\'s arch{arch}, or load weights '
            f'of this arch.')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # Derived buffers of the original or of mmpretrain's models are
        # recomputed here; drop them so strict loading accepts such files.
        if self.derived_buffers:
            for key in list(state_dict):
                if key.startswith(prefix) and key.endswith(
                        self.derived_buffers):
                    del state_dict[key]
        # A file of another layout would load nothing, with only a log of
        # missing keys under strict=False (load_from, Pretrained): refuse.
        # (The loaders hand a module only the keys under its prefix.) A
        # part of a model, loaded with strict=False, loads as in torch.
        own = self.state_dict(keep_vars=True)
        fits, resized, skipped = self._fitting(state_dict, prefix, own)
        if len(fits) < self.min_loaded_share * len(own) and self._misplaced(
                state_dict, prefix, fits, unexpected_keys):
            raise self._mismatch_error(
                state_dict, prefix, len(fits), others=unexpected_keys)
        # The file's weights load: it may be a shallower model's.
        depth_error = self._depth_error(state_dict, prefix)
        if depth_error is not None:
            raise depth_error
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # (A part loaded on purpose, with strict=False, is not described:
        # what it lacks is not new, and torch lists it.)
        if len(fits) >= self.min_loaded_share * len(own):
            self._log_partial_load(own, fits, resized, skipped)
        if not self.with_fsla:
            unused = [
                k for k in state_dict
                if k.startswith(prefix) and _is_fsla_key(k)
            ]
            if unused:
                print_log(
                    f'{type(self).__name__}: built with with_fsla=False, so '
                    f'the {len(unused)} FSLA weights of the checkpoint are '
                    f'not used (the plain Swin / CSWin part loads).',
                    logger='current',
                    level=logging.INFO)

    def _log_partial_load(self, own: Mapping[str, Tensor], fits: List[str],
                          resized: List[str], skipped: List[str]) -> None:
        """Say how many weights came from a checkpoint and which are new
        (FSLA from a Swin / CSWin checkpoint, output norms from a
        classifier's), when some are not in it.

        Args:
            own (Mapping[str, Tensor]): The module's own state dict.
            fits (list[str]): Its keys that loaded.
            resized (list[str]): Those of them resized.
            skipped (list[str]): Its keys skipped for another shape.
        """
        # Derived buffers are computed, never loaded: not counted.
        drop = self.derived_buffers
        weights = [k for k in own if not (drop and k.endswith(drop))]
        fitting = set(fits)
        loaded = [k for k in weights if k in fitting]
        if len(loaded) == len(weights):
            return
        got = fitting | set(skipped)
        new = [k for k in weights if k not in got]
        fsla = [k for k in new if _is_fsla_key(k)]
        out_norms = {f'norm{i}' for i in self.out_indices}
        norms = [k for k in new if k.split('.')[0] in out_norms]
        named = set(fsla) | set(norms)
        other = [k for k in new if k not in named]
        parts = []
        if fsla:
            blocks = sorted(
                {k.split('.fsla.')[0].split('.norm_fsla')[0]
                 for k in fsla})
            # A checkpoint with FSLA weights elsewhere is a BOAT one (e.g.
            # of a shallower arch), not a Swin / CSWin.
            why = ('not in the checkpoint' if any(map(_is_fsla_key, got)) else
                   'which a Swin / CSWin checkpoint lacks')
            parts.append(f'FSLA ({len(fsla)} weights in {len(blocks)} '
                         f'blocks, {why})')
        if norms:
            parts.append(f'output norms '
                         f"{sorted({k.split('.')[0] for k in norms})} "
                         f'({len(norms)} weights)')
        if other:
            parts.append(f'{len(other)} more: {key_listing(other, 5)}')
        msg = (f'{type(self).__name__}: {len(loaded)} of the {len(weights)}'
               f' weights of the backbone came from the checkpoint')
        if resized:
            msg += f' ({len(resized)} resized to this model\'s shape)'
        if skipped:
            msg += (f'; {len(skipped)} of another shape were skipped: '
                    f'{key_listing(skipped, 5)}')
        if parts:
            msg += ('; new, initialised as from scratch: ' + '; '.join(parts))
        print_log(msg + '.', logger='current', level=logging.INFO)
