# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT-CSWin: the CSWin Transformer with feature-space local attention."""
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import FFN, PatchEmbed
from mmengine.model import BaseModule, ModuleList
from torch import Tensor

from boat_mm.registry import MODELS
from ..utils import CSWinAttention, FeatureSpaceLocalAttention
from ..utils.arch import (FrozenStagesMixin, check_frozen_stages,
                          check_pretrained_file, fsla_settings,
                          parse_arch, parse_out_indices)

__all__ = ['BOATCSWinBlock', 'BOATCSWinStage', 'BOATCSWin']


class BOATCSWinBlock(BaseModule):
    """One BOAT-CSWin block.

    ``x = x + DropPath(CSWinAttn(LN1(x)))``;
    ``x = x + DropPath(FSLA(LN_fsla(x)))`` (only with ``with_fsla``);
    ``x = x + DropPath(MLP(LN2(x)))``.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Heads of the CSWin attention and of FSLA.
        split_size (int): Stripe width of the CSWin attention.
        full_map (bool): CSWin attention over the whole map (last stage).
        mlp_ratio (float): Hidden width of the MLP over ``embed_dims``.
            Defaults to 4.
        qkv_bias (bool): Bias of the qkv projections. Defaults to True.
        qk_scale (float, optional): Scale of the CSWin attention logits;
            None for ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout after projections and in the MLP.
            Defaults to 0.
        attn_drop_rate (float): Dropout on attention weights. Defaults to 0.
        drop_path_rate (float): Stochastic depth of all three residuals.
            Defaults to 0.
        with_fsla (bool): Add the FSLA residual. Defaults to True.
        fsla_cfg (dict, optional): Keyword arguments of
            :class:`FeatureSpaceLocalAttention` (without ``embed_dims`` and
            ``num_heads``). Defaults to None.
        act_cfg (dict): Activation of the MLP. Defaults to GELU.
        norm_cfg (dict): Normalisation layers. Defaults to LN.
        with_cp (bool): Gradient checkpointing of the whole block.
            Defaults to False.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 split_size: int,
                 full_map: bool = False,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 with_fsla: bool = True,
                 fsla_cfg: Optional[dict] = None,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.with_cp = with_cp
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = CSWinAttention(
            embed_dims,
            num_heads,
            split_size=split_size,
            full_map=full_map,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop_rate,
            proj_drop=drop_rate)
        self.with_fsla = with_fsla
        if with_fsla:
            self.norm_fsla = build_norm_layer(norm_cfg, embed_dims)[1]
            self.fsla = FeatureSpaceLocalAttention(embed_dims, num_heads,
                                                   **(fsla_cfg or {}))
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        drop_path = dict(type='BOATDropPath', drop_prob=drop_path_rate)
        self.drop_path = build_dropout(drop_path)
        self.ffn = FFN(
            embed_dims=embed_dims,
            feedforward_channels=int(embed_dims * mlp_ratio),
            num_fcs=2,
            ffn_drop=drop_rate,
            dropout_layer=drop_path,
            act_cfg=act_cfg,
            add_identity=True)

    def forward(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward ``(B, N, C)`` tokens of a ``hw_shape`` map."""

        def _inner_forward(x: Tensor) -> Tensor:
            x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
            if self.with_fsla:
                x = x + self.drop_path(self.fsla(self.norm_fsla(x), hw_shape))
            return self.ffn(self.norm2(x), identity=x)

        if self.with_cp and torch.is_grad_enabled():
            # Non-reentrant: works when x needs no grad (frozen stem) too.
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


class BOATCSWinStage(BaseModule):
    """An optional conv downsampling followed by BOAT-CSWin blocks.

    Args:
        in_channels (int): Channels entering the stage.
        embed_dims (int): Channels of the blocks.
        depth (int): Number of blocks.
        num_heads (int): Heads per block.
        split_size (int): Stripe width.
        full_map (bool): Whole-map CSWin attention (last stage).
        downsample (bool): Start with a 3x3 stride-2 conv + norm (CSWin's
            merge block) from ``in_channels`` to ``embed_dims``.
        drop_path_rates (Sequence[float]): One rate per block.
        fsla_blocks (Sequence[bool]): Whether each block has FSLA.
        block_cfg (dict): Remaining :class:`BOATCSWinBlock` arguments.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 in_channels: int,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 split_size: int,
                 full_map: bool,
                 downsample: bool,
                 drop_path_rates: Sequence[float],
                 fsla_blocks: Sequence[bool],
                 block_cfg: dict,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if downsample:
            # Conv 3x3, stride 2, padding 1: output ceil(H / 2) x ceil(W / 2).
            self.downsample = PatchEmbed(
                in_channels=in_channels,
                embed_dims=embed_dims,
                kernel_size=3,
                stride=2,
                padding=1,
                norm_cfg=block_cfg.get('norm_cfg', dict(type='LN')))
        else:
            self.downsample = None
        self.blocks = ModuleList([
            BOATCSWinBlock(
                embed_dims,
                num_heads,
                split_size,
                full_map=full_map,
                drop_path_rate=drop_path_rates[i],
                with_fsla=fsla_blocks[i],
                **block_cfg) for i in range(depth)
        ])

    def forward(self, x: Tensor,
                hw_shape: Sequence[int]) -> Tuple[Tensor, Tuple[int, int]]:
        """Forward ``(B, N, C)`` tokens; returns tokens and their shape."""
        if self.downsample is not None:
            B, _, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, *hw_shape)
            x, hw_shape = self.downsample(x)
        for block in self.blocks:
            x = block(x, hw_shape)
        return x, tuple(hw_shape)


@MODELS.register_module()
class BOATCSWin(FrozenStagesMixin, BaseModule):
    """BOAT-CSWin backbone (Yu et al., "BOAT: Bilateral Local Attention
    Vision Transformer", BMVC 2022), for classification and dense prediction.

    CSWin Transformer (conv stem, cross-shaped stripe attention with LePE,
    conv merging) with feature-space local attention (FSLA, scale 1.0 as in
    the published weights) in the even-indexed blocks of every stage.

    Any input size works: the input is padded at the bottom/right to a
    multiple of 4 before the 7x7 stride-4 stem (which by itself gives
    ``floor((H - 3) / 4) + 1`` rows, one short of ``ceil(H / 4)`` when
    ``H % 4`` is 1 or 2), and every 3x3 stride-2 merge gives ``ceil(H / 2)``.
    So stage ``i`` outputs ``ceil(H / 4)``, then halved and rounded up
    (``ceil(H / 2**(i + 2))``), exactly as mmseg's Swin. Stripes are padded
    symmetrically and cropped back (see :mod:`..utils.cswin_attn`); the last
    stage attends over its whole map and FSLA clusters any number of tokens.

    Module layout: ``patch_embed`` (stem conv + norm), ``stages[i]`` with
    ``downsample`` (the merge before stage ``i``, ``i >= 1``) and
    ``blocks``, and ``norm{i}`` for each output. The final norm of the
    classifier is ``norm{last}``: with ``out_indices=(3, )``, mmpretrain's
    ``GlobalAveragePooling`` and ``LinearClsHead`` this computes what the
    original classifier computes (final norm, mean over tokens, linear).
    Convert the published checkpoints with
    ``tools/model_converters/boat2mm.py``.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``,
            ``'s'``, ``'b'``), or a dict with ``embed_dims``, ``depths``,
            ``num_heads`` and optionally ``split_sizes`` (defaults to
            ``(1, 2, 7, 7)``). Widths double at each stage.
            Defaults to ``'tiny'``.
        in_channels (int): Input channels. Defaults to 3.
        mlp_ratio (float): MLP hidden width ratio. Defaults to 4.
        out_indices (Sequence[int] | int): Stages to output (negative counts
            from the end). Defaults to ``(0, 1, 2, 3)``.
        qkv_bias (bool): Bias of the qkv projections. Defaults to True.
        qk_scale (float, optional): Scale of the CSWin attention logits;
            None for ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout rate. Defaults to 0.
        attn_drop_rate (float): Attention dropout rate. Defaults to 0.
        drop_path_rate (float): Stochastic depth, growing linearly from 0 to
            this value over all blocks. Defaults to 0.1.
        with_fsla (bool): Add FSLA to the even-indexed blocks; False gives
            the plain CSWin Transformer. Defaults to True.
        fsla_cfg (dict, optional): Passed to
            :class:`FeatureSpaceLocalAttention` (``group_size``,
            ``overlap``, ``kmeans_iters``, ``kmeans_temperature``,
            ``qk_scale``, ...); ``qk_scale`` defaults to 1.0, the scale the
            published BOAT-CSWin weights were trained with. Defaults to None.
        act_cfg (dict): MLP activation. Defaults to GELU.
        norm_cfg (dict): Norm layers of blocks, stem, merges and outputs.
            Defaults to LN.
        frozen_stages (int): Freeze (stop grad, eval mode) the stem when
            >= 0 and stages ``0 .. frozen_stages - 1`` with their merges and
            output norms. -1 freezes nothing. Defaults to -1.
        with_cp (bool): Gradient checkpointing of every block, to save
            memory at the cost of recomputation. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialisation config, e.g.
            ``dict(type='Pretrained', checkpoint=PATH, prefix='backbone.')``
            to load the backbone of a converted classifier checkpoint. None
            uses truncated normal (std 0.02) Linear and unit LayerNorm
            initialisation. Defaults to None.
    """
    arch_zoo = {
        **dict.fromkeys(
            ['t', 'tiny'], {
                'embed_dims': 64,
                'depths': [1, 2, 21, 1],
                'num_heads': [2, 4, 8, 16],
                'split_sizes': [1, 2, 7, 7]
            }),
        **dict.fromkeys(
            ['s', 'small'], {
                'embed_dims': 64,
                'depths': [2, 4, 32, 2],
                'num_heads': [2, 4, 8, 16],
                'split_sizes': [1, 2, 7, 7]
            }),
        **dict.fromkeys(
            ['b', 'base'], {
                'embed_dims': 96,
                'depths': [2, 4, 32, 2],
                'num_heads': [4, 8, 16, 32],
                'split_sizes': [1, 2, 7, 7]
            }),
    }
    essential_keys = {'embed_dims', 'depths', 'num_heads'}
    optional_keys = {'split_sizes'}
    # Input padded to a multiple of the stem stride (see class docstring).
    stem_stride = 4

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
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if init_cfg is None:
            # CSWin's (timm's) initialisation; conv layers keep PyTorch's.
            init_cfg = [
                dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
                dict(type='Constant', layer='LayerNorm', val=1., bias=0.)
            ]
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = self.arch_settings['embed_dims']
        self.depths = list(self.arch_settings['depths'])
        self.num_heads = list(self.arch_settings['num_heads'])
        self.split_sizes = list(self.arch_settings['split_sizes'])
        self.num_stages = len(self.depths)
        self.num_features = [
            self.embed_dims * 2**i for i in range(self.num_stages)
        ]
        self.out_indices = parse_out_indices(out_indices, self.num_stages)
        check_frozen_stages(frozen_stages, self.num_stages)
        self.frozen_stages = frozen_stages
        self.with_fsla = with_fsla
        self.fsla_cfg = fsla_settings(
            fsla_cfg,
            qk_scale=1.0,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop_rate,
            proj_drop=drop_rate)

        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.embed_dims,
            kernel_size=7,
            stride=self.stem_stride,
            padding=2,
            norm_cfg=norm_cfg)

        total_depth = sum(self.depths)
        dpr = torch.linspace(0, drop_path_rate, total_depth).tolist()
        block_cfg = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            fsla_cfg=self.fsla_cfg,
            act_cfg=act_cfg,
            norm_cfg=norm_cfg,
            with_cp=with_cp)
        self.stages = ModuleList()
        for i, depth in enumerate(self.depths):
            self.stages.append(
                BOATCSWinStage(
                    in_channels=self.num_features[max(i - 1, 0)],
                    embed_dims=self.num_features[i],
                    depth=depth,
                    num_heads=self.num_heads[i],
                    split_size=self.split_sizes[i],
                    full_map=i == self.num_stages - 1,
                    downsample=i > 0,
                    drop_path_rates=dpr[:depth],
                    # FSLA in the even-indexed blocks of every stage.
                    fsla_blocks=[
                        with_fsla and j % 2 == 0 for j in range(depth)
                    ],
                    block_cfg=block_cfg))
            dpr = dpr[depth:]

        for i in self.out_indices:
            self.add_module(
                f'norm{i}',
                build_norm_layer(norm_cfg, self.num_features[i])[1])
        self._freeze_stages()

    def _parse_arch(self, arch: Union[str, dict]) -> Dict:
        settings = parse_arch(arch, self.arch_zoo, self.essential_keys,
                              'BOATCSWin')
        unknown = set(settings) - self.essential_keys - self.optional_keys
        if unknown:
            raise ValueError(
                f'Unknown keys {sorted(unknown)} in the BOATCSWin arch '
                f'dict; it takes {sorted(self.essential_keys)} and '
                f'optionally {sorted(self.optional_keys)}.')
        settings = deepcopy(settings)
        n = len(settings['depths'])
        settings.setdefault('split_sizes', [1, 2, 7, 7][:n] + [7] * (n - 4))
        if n < 1 or len(settings['num_heads']) != n \
                or len(settings['split_sizes']) != n:
            raise ValueError(
                f'BOATCSWin arch: depths, num_heads and split_sizes need one '
                f'entry per stage, got {settings["depths"]}, '
                f'{settings["num_heads"]}, {settings["split_sizes"]}.')
        return settings

    def init_weights(self) -> None:
        """Load ``init_cfg`` or apply the default initialisation."""
        check_pretrained_file(self.init_cfg, 'BOATCSWin')
        super().init_weights()

    def _stage_tokens(self, x: Tensor):
        """Yield ``(index, tokens, hw_shape)`` after each stage."""
        if x.dim() != 4:
            raise ValueError(
                f'BOATCSWin expects images of shape (B, C, H, W), got a '
                f'tensor of shape {tuple(x.shape)}.')
        s = self.stem_stride
        pad_h, pad_w = -x.shape[2] % s, -x.shape[3] % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x, hw_shape = self.patch_embed(x)
        for i, stage in enumerate(self.stages):
            x, hw_shape = stage(x, hw_shape)
            yield i, x, hw_shape

    def _to_map(self, x: Tensor, i: int, hw_shape: Sequence[int]) -> Tensor:
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
            ``(B, C_i, H_i, W_i)`` map with ``H_i = ceil(H / 2**(i + 2))``.
        """
        outs = []
        for i, tokens, hw_shape in self._stage_tokens(x):
            if i in self.out_indices:
                tokens = getattr(self, f'norm{i}')(tokens)
                outs.append(self._to_map(tokens, i, hw_shape))
            if i == self.out_indices[-1]:
                break  # later stages are not needed
        return tuple(outs)
