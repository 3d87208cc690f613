# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT-CSWin: the CSWin Transformer with feature-space local attention."""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule, ModuleList
from torch import Tensor

from boat_mm.registry import MODELS
from ..utils import CSWinAttention
from ..utils.ckpt_convert import (PublishedLayout, add_module_keys,
                                  blocks_per_stage)
from .base_boat import BaseBOATBackbone, BaseBOATBlock

__all__ = [
    'BOATCSWinBlock', 'BOATCSWinStage', 'BOATCSWin', 'BOATCSWinPublished'
]


class BOATCSWinBlock(BaseBOATBlock):
    """One BOAT-CSWin block.

    ``x = x + DropPath(CSWinAttn(LN1(x)))``;
    ``x = x + DropPath(FSLA(LN_fsla(x)))`` (only with ``with_fsla``);
    ``x = x + DropPath(MLP(LN2(x)))``.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Heads of the CSWin attention and of FSLA.
        split_size (int): Stripe width of the CSWin attention.
        full_map (bool): CSWin attention over the whole map (last stage).
        with_fsla (bool): Add the FSLA residual. Defaults to True.
        **kwargs: The other arguments of :class:`BaseBOATBlock`
            (``fsla_cfg``, ``drop_path_rate``, ``with_cp``, ...).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 split_size: int,
                 full_map: bool = False,
                 with_fsla: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(
            embed_dims,
            num_heads,
            attn_cfg=dict(split_size=split_size, full_map=full_map),
            with_fsla=with_fsla,
            **kwargs)
        self.drop_path = build_dropout(self.drop_path_cfg)

    def _build_attention(self, embed_dims: int, num_heads: int,
                         **kwargs) -> nn.Module:
        return CSWinAttention(embed_dims, num_heads, **kwargs)

    def _residuals(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
        if self.with_fsla:
            x = x + self.drop_path(self.fsla(self.norm_fsla(x), hw_shape))
        return self.ffn(self.norm2(x), identity=x)


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

    def forward(
        self, x: Tensor, hw_shape: Sequence[int]
    ) -> Tuple[Tensor, Tuple[int, int], Tensor, Tuple[int, int]]:
        """Forward.

        Args:
            x (Tensor): ``(B, N, C)`` tokens.
            hw_shape (Sequence[int]): ``(H, W)`` of the map, ``N = H * W``.

        Returns:
            tuple: The tokens and their shape twice: for the next stage
            and as this stage's output (the same tensor).
        """
        if self.downsample is not None:
            B, _, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, *hw_shape)
            x, hw_shape = self.downsample(x)
        for block in self.blocks:
            x = block(x, hw_shape)
        return x, tuple(hw_shape), x, tuple(hw_shape)


@MODELS.register_module()
class BOATCSWin(BaseBOATBackbone):
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

    FSLA's ``qk_scale`` defaults to 1.0, the scale the published BOAT-CSWin
    weights were trained with (``fsla_cfg`` may set another); ``qk_scale``
    scales the CSWin attention logits only. Conv layers keep PyTorch's
    initialisation, as the original.

    Args:
        arch (str | dict): See :class:`BaseBOATBackbone`; a dict takes
            ``embed_dims``, ``depths``, ``num_heads`` and optionally
            ``split_sizes`` (stripe widths, defaults to ``(1, 2, 7, 7)``;
            the last stage attends over its whole map, so its entry is
            not used). Defaults to ``'tiny'``.
        in_channels (int): Input channels. Defaults to 3.
        **kwargs: The other arguments of :class:`BaseBOATBackbone`
            (``out_indices``, ``drop_path_rate``, ``with_fsla``,
            ``fsla_cfg``, ``frozen_stages``, ``with_cp``, ``init_cfg``,
            ...).
    """
    family = 'cswin'
    # yapf: disable
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(
            embed_dims=[64, 128, 256, 512], depths=[1, 2, 21, 1],
            num_heads=[2, 4, 8, 16], split_sizes=[1, 2, 7, 7])),
        **dict.fromkeys(['s', 'small'], dict(
            embed_dims=[64, 128, 256, 512], depths=[2, 4, 32, 2],
            num_heads=[2, 4, 8, 16], split_sizes=[1, 2, 7, 7])),
        **dict.fromkeys(['b', 'base'], dict(
            embed_dims=[96, 192, 384, 768], depths=[2, 4, 32, 2],
            num_heads=[4, 8, 16, 32], split_sizes=[1, 2, 7, 7])),
    }
    # yapf: enable
    optional_keys = frozenset({'split_sizes'})
    fsla_qk_scale = 1.0
    downsample_first = True  # the merge before stage i >= 1
    # Input padded to a multiple of the stem stride (see class docstring).
    stem_stride = 4

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 **kwargs: Any) -> None:
        super().__init__(arch=arch, in_channels=in_channels, **kwargs)
        self.split_sizes = list(self.arch_settings['split_sizes'])
        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.num_features[0],
            kernel_size=7,
            stride=self.stem_stride,
            padding=2,
            norm_cfg=self.norm_cfg)
        self.stages = ModuleList([
            BOATCSWinStage(
                in_channels=self.num_features[max(i - 1, 0)],
                embed_dims=self.num_features[i],
                depth=depth,
                num_heads=self.num_heads[i],
                split_size=self.split_sizes[i],
                full_map=i == self.num_stages - 1,
                downsample=i > 0,
                drop_path_rates=self.drop_path_rates[i],
                fsla_blocks=[
                    self.with_fsla and self.has_fsla(i, j, self.num_stages)
                    for j in range(depth)
                ],
                block_cfg=self.block_cfg)
            for i, depth in enumerate(self.depths)
        ])
        self._add_output_norms()

    @staticmethod
    def has_fsla(stage: int, block: int, num_stages: int) -> bool:
        """Whether a block holds FSLA: the even-indexed blocks of every stage.

        Args:
            stage (int): Index of the stage.
            block (int): Index of the block in its stage.
            num_stages (int): Number of stages of the backbone.

        Returns:
            bool: True if the block has an FSLA residual.
        """
        return block % 2 == 0

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> Dict:
        settings = super()._parse_arch(arch)
        n = len(settings['depths'])
        settings.setdefault('split_sizes', [1, 2, 7, 7][:n] + [7] * (n - 4))
        for i, heads in enumerate(settings['num_heads'][:-1]):
            # The last stage attends over the full map, with any heads.
            if heads % 2:
                raise ValueError(
                    f'{cls.__name__} arch: stage {i} has {heads} '
                    f'heads, but every stage but the last splits its heads '
                    f'between two stripe branches: give it an even '
                    f'num_heads (got {settings["num_heads"]}).')
        return settings

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        s = self.stem_stride
        pad_h, pad_w = -x.shape[2] % s, -x.shape[3] % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.patch_embed(x)


class BOATCSWinPublished(PublishedLayout):
    """The published BOAT-CSWin checkpoints (``BOAT-CSWin/models/
    cswin_boat.py`` of the public code, timm's saver: weights under
    ``state_dict`` / ``state_dict_ema``); plain CSWin files (no
    ``content_attn``) too.

    Blocks are ``stage{s}.{j}`` with ``s`` from 1, merges ``merge{s}``
    (before stage ``s + 1``), the stem ``stage1_conv_embed``.
    """
    _BLOCK_KEY = r'stage(\d+)\.(\d+)\.'
    # Published block module -> ours (``BOATCSWinBlock``); ``attns.1`` in
    # all but the last stage, the FSLA modules in the blocks with FSLA.
    _BLOCK_MODULES = (('norm1', 'norm1'), ('qkv', 'attn.qkv'),
                      ('attns.0.get_v', 'attn.branches.0.get_v'),
                      ('attns.1.get_v',
                       'attn.branches.1.get_v'), ('proj', 'attn.proj'),
                      ('norm3', 'norm_fsla'), ('content_attn.qkv', 'fsla.qkv'),
                      ('content_attn.proj',
                       'fsla.proj'), ('content_attn.get_v', 'fsla.get_v'),
                      ('norm2', 'norm2'), ('mlp.fc1',
                                           'ffn.layers.0.0'), ('mlp.fc2',
                                                               'ffn.layers.1'))
    _FSLA_MODULES = ('norm3', 'content_attn.qkv', 'content_attn.proj',
                     'content_attn.get_v')

    def detect(self, state_dict: Mapping[str, Tensor]) -> dict:
        """Describe a BOAT-CSWin (or plain CSWin) checkpoint.

        Args:
            state_dict (Mapping[str, Tensor]): Weights in this layout.

        Returns:
            dict: ``arch`` ('tiny', 'small', 'base' or None when the widths
            and depths match none of them: then ``num_heads`` must come
            from elsewhere), ``embed_dims`` (per stage, from the blocks'
            norms), ``depths``, ``in_channels``, ``with_fsla`` (whether the
            file has FSLA weights, i.e. BOAT-CSWin rather than CSWin) and
            ``num_classes`` (None without a head).
        """
        stem = 'stage1_conv_embed.0.weight'
        if stem not in state_dict:
            raise KeyError(f'Not a BOAT-CSWin checkpoint: {stem!r} is '
                           f'missing; first keys: {list(state_dict)[:5]}.')
        blocks = blocks_per_stage(state_dict, self._BLOCK_KEY)
        num_stages = max(blocks, default=0)
        depths = tuple(blocks.get(k, 0) for k in range(1, num_stages + 1))
        if not depths or 0 in depths:
            raise KeyError(f'BOAT-CSWin checkpoint without blocks for some '
                           f'stage: blocks per stage {depths}.')
        widths = []
        for s in range(1, num_stages + 1):
            norm = state_dict.get(f'stage{s}.0.norm1.weight')
            if norm is None:
                raise KeyError(f'BOAT-CSWin checkpoint without the norm1 of '
                               f'stage{s}.0.')
            widths.append(int(norm.shape[0]))
        head = state_dict.get('head.weight')
        return dict(
            # Head counts leave no trace in CSWin's weights.
            arch=self.backbone.zoo_name(embed_dims=widths, depths=depths),
            embed_dims=widths,
            depths=depths,
            in_channels=int(state_dict[stem].shape[1]),
            with_fsla=any('.content_attn.' in k for k in state_dict),
            num_classes=None if head is None else int(head.shape[0]))

    def backbone_cfg(self, info: dict) -> dict:
        """The backbone arguments for a published checkpoint.

        Args:
            info (dict): The checkpoint, as :meth:`detect` describes it.

        Returns:
            dict: Arguments (without ``type``) of the backbone.

        Raises:
            ValueError: The widths and depths match no published arch, so
                the head counts are unknown.
        """
        if info['arch'] is None:
            raise ValueError(
                f'BOAT-CSWin checkpoint with embed_dims '
                f'{list(info["embed_dims"])} and depths {info["depths"]} '
                f'matches none of the published archs (tiny, small, base); '
                f'its head counts cannot be read from the weights.')
        return super().backbone_cfg(info)

    def add_stage_keys(self, names: Dict[str, str], stage: int,
                       info: dict) -> None:
        """Add the published keys of a stage (its merging included).

        Args:
            names (dict[str, str]): Published key -> boat-mm key; added to
                in place.
            stage (int): Index of the stage, from 0.
            info (dict): The model, as :meth:`detect` describes it.
        """
        num = len(info['depths'])
        if stage > 0:
            # merge{s} sits before stage s+1: our stages[s].downsample.
            dst = f'backbone.stages.{stage}.downsample'
            add_module_keys(names, f'merge{stage}.conv', f'{dst}.projection')
            add_module_keys(names, f'merge{stage}.norm', f'{dst}.norm')
        for i in range(info['depths'][stage]):
            fsla = info['with_fsla'] and self.backbone.has_fsla(stage, i, num)
            for src, dst in self._BLOCK_MODULES:
                if src == 'attns.1.get_v' and stage == num - 1:
                    continue  # one whole-map branch in the last stage
                if src in self._FSLA_MODULES and not fsla:
                    continue
                add_module_keys(names, f'stage{stage + 1}.{i}.{src}',
                                f'backbone.stages.{stage}.blocks.{i}.{dst}')


# yapf: disable
BOATCSWin.published = BOATCSWinPublished(
    BOATCSWin, 'BOAT-CSWin', marker='stage1_conv_embed',
    stem=('stage1_conv_embed.0', 'stage1_conv_embed.2'),
    code=('BOAT-CSWin', 'models/cswin_boat.py'),
    plain_name='CSWin (official)')
# yapf: enable
