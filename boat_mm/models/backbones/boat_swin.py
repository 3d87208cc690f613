# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT-Swin: Swin Transformer with feature-space local attention."""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn.bricks.transformer import PatchEmbed, PatchMerging
from mmengine.model import BaseModule, ModuleList
from torch import Tensor

from boat_mm.registry import MODELS
from ..utils.arch import check_int
from ..utils.ckpt_convert import (PublishedLayout, add_module_keys,
                                  blocks_per_stage)
from ..utils.window_attn import BOATShiftWindowMSA
from .base_boat import BaseBOATBackbone, BaseBOATBlock

__all__ = [
    'BOATSwin', 'BOATSwinBlock', 'BOATSwinStage', 'BOATSwinPublished',
    'swin_merge_order'
]


class BOATSwinBlock(BaseBOATBlock):
    """Swin block with optional feature-space local attention (FSLA).

    ``x = x + DropPath(W-MSA / SW-MSA(LN1(x)))``;
    ``x = x + FSLA(LN_fsla(x))`` (when ``with_fsla``; no DropPath on this
    residual, as in the original);
    ``x = x + DropPath(FFN(LN2(x)))``.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Heads of the window attention and of FSLA.
        window_size (int): Window side. Defaults to 7.
        shift (bool): Shifted windows. Defaults to False.
        **kwargs: The other arguments of :class:`BaseBOATBlock`
            (``with_fsla``, ``fsla_cfg``, ``drop_path_rate``, ...).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int = 7,
                 shift: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(
            embed_dims,
            num_heads,
            attn_cfg=dict(window_size=window_size, shift=shift),
            **kwargs)

    def _build_attention(self, embed_dims: int, num_heads: int,
                         window_size: int, shift: bool, **kwargs) -> nn.Module:
        return BOATShiftWindowMSA(
            embed_dims,
            num_heads,
            window_size,
            shift_size=window_size // 2 if shift else 0,
            dropout_layer=self.drop_path_cfg,
            **kwargs)

    def _residuals(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), hw_shape)
        if self.with_fsla:
            x = x + self.fsla(self.norm_fsla(x), hw_shape)
        return self.ffn(self.norm2(x), identity=x)


class BOATSwinStage(BaseModule):
    """BOAT-Swin blocks followed by an optional patch merging.

    Args:
        embed_dims (int): Channels of the blocks.
        depth (int): Number of blocks (even ones plain, odd ones shifted).
        num_heads (int): Heads per block.
        drop_path_rates (Sequence[float]): One rate per block.
        fsla_blocks (Sequence[bool]): Whether each block has FSLA.
        downsample_dims (int, optional): End with mmcv's ``PatchMerging``
            of 2x2 neighbours to this many channels; None: no merging.
        block_cfg (dict): Remaining :class:`BOATSwinBlock` arguments.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 drop_path_rates: Sequence[float],
                 fsla_blocks: Sequence[bool],
                 downsample_dims: Optional[int],
                 block_cfg: dict,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.blocks = ModuleList([
            BOATSwinBlock(
                embed_dims,
                num_heads,
                shift=i % 2 == 1,
                with_fsla=fsla_blocks[i],
                drop_path_rate=drop_path_rates[i],
                **block_cfg) for i in range(depth)
        ])
        if downsample_dims is not None:
            self.downsample = PatchMerging(
                in_channels=embed_dims,
                out_channels=downsample_dims,
                norm_cfg=block_cfg.get('norm_cfg', dict(type='LN')),
                bias=False)
        else:
            self.downsample = None

    def forward(
        self, x: Tensor, hw_shape: Sequence[int]
    ) -> Tuple[Tensor, Tuple[int, int], Tensor, Tuple[int, int]]:
        """Forward.

        Args:
            x (Tensor): ``(B, N, C)`` tokens.
            hw_shape (Sequence[int]): ``(H, W)`` of the map, ``N = H * W``.

        Returns:
            tuple: The merged tokens and their shape (for the next
            stage), then the stage's own tokens and shape (its output);
            both pairs are the stage's own without a merging.
        """
        for block in self.blocks:
            x = block(x, hw_shape)
        if self.downsample is None:
            return x, tuple(hw_shape), x, tuple(hw_shape)
        x_down, down_shape = self.downsample(x, hw_shape)
        return x_down, tuple(down_shape), x, tuple(hw_shape)


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


@MODELS.register_module()
class BOATSwin(BaseBOATBackbone):
    """BOAT-Swin backbone (Yu et al., "BOAT: Bilateral Local Attention
    Vision Transformer", BMVC 2022), for classification and dense prediction.

    Swin Transformer (patch embedding, (shifted) window attention with
    relative position bias, patch merging) with feature-space local
    attention (FSLA) in the shifted-window (odd) blocks of every stage but
    the last.

    Any input size works. The image is padded at the bottom/right to a
    multiple of the patch size, every merging pads odd maps, and windows are
    padded (and masked) then cropped back, so stage ``i`` outputs
    ``ceil(H / 2**(i + 2))`` rows as mmseg's Swin. As in the original, the
    window shift (not FSLA) is off where one window spans the shorter side.

    Module layout (as mmpretrain's/mmseg's Swin): ``patch_embed``,
    ``stages[i].blocks[j].{norm1, attn.w_msa, norm_fsla, fsla, norm2,
    ffn}``, ``stages[i].downsample`` (merging after stage ``i``), and a norm
    ``norm{i}`` per output. With ``out_indices=(3, )``, mmpretrain's
    ``GlobalAveragePooling`` and ``LinearClsHead`` compute what the original
    classifier computes (final norm, mean over tokens, linear). Convert the
    published checkpoints with ``tools/model_converters/boat2mm.py``.

    The published models used ``drop_path_rate`` 0.2 (T), 0.3 (S) and 0.5
    (B); FSLA takes the window attention's ``qk_scale`` unless ``fsla_cfg``
    sets one. The position-bias tables are initialised truncated normal
    (std 0.02), as the original.

    Args:
        arch (str | dict): See :class:`BaseBOATBackbone`; a dict takes
            exactly ``embed_dims``, ``depths`` and ``num_heads``.
            Defaults to ``'tiny'``.
        patch_size (int): Patch embedding stride and kernel. Defaults to 4.
        in_channels (int): Input channels. Defaults to 3.
        window_size (int): Window side. Defaults to 7.
        **kwargs: The other arguments of :class:`BaseBOATBackbone`
            (``out_indices``, ``drop_path_rate``, ``with_fsla``,
            ``fsla_cfg``, ``frozen_stages``, ``with_cp``, ``init_cfg``,
            ...).

    Example:
        >>> import torch
        >>> from boat_mm.models import BOATSwin
        >>> model = BOATSwin(arch=dict(embed_dims=24, depths=(2, 2, 2, 2),
        ...                            num_heads=(1, 2, 2, 4)))
        >>> [tuple(o.shape) for o in model(torch.randn(1, 3, 64, 80))]
        [(1, 24, 16, 20), (1, 48, 8, 10), (1, 96, 4, 5), (1, 192, 2, 3)]
    """
    family = 'swin'
    fsla_blocks = ('the odd, shifted blocks of every stage but the last: a '
                   'stage before the last needs 2 or more blocks')
    # yapf: disable
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(
            embed_dims=[96, 192, 384, 768], depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24])),
        **dict.fromkeys(['s', 'small'], dict(
            embed_dims=[96, 192, 384, 768], depths=[2, 2, 18, 2],
            num_heads=[3, 6, 12, 24])),
        **dict.fromkeys(['b', 'base'], dict(
            embed_dims=[128, 256, 512, 1024], depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32])),
    }
    # yapf: enable
    # Buffers that older or foreign checkpoints may carry; boat-mm derives
    # them.
    derived_buffers = ('relative_position_index', 'attn_mask')
    # Tables of another window size are resized (BOATShiftWindowMSA).
    resized_on_load = ('relative_position_bias_table', )
    stem_modules = ('patch_embed', 'drop_after_pos')

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 patch_size: int = 4,
                 in_channels: int = 3,
                 window_size: int = 7,
                 **kwargs: Any) -> None:
        super().__init__(arch=arch, in_channels=in_channels, **kwargs)
        self._check_family_arguments(
            dict(window_size=window_size, patch_size=patch_size))
        self.stem_stride = patch_size
        # 'corner' padding: any input size, ceil(H / patch_size) rows.
        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.num_features[0],
            conv_type='Conv2d',
            kernel_size=patch_size,
            stride=patch_size,
            padding='corner',
            norm_cfg=self.norm_cfg)
        self.drop_after_pos = nn.Dropout(p=self.block_cfg['drop_rate'])
        block_cfg = dict(self.block_cfg, window_size=window_size)
        self.stages = ModuleList([
            BOATSwinStage(
                embed_dims=self.num_features[i],
                depth=depth,
                num_heads=self.num_heads[i],
                drop_path_rates=self.drop_path_rates[i],
                fsla_blocks=[
                    self.with_fsla and self.has_fsla(i, j, self.num_stages)
                    for j in range(depth)
                ],
                downsample_dims=self.num_features[i +
                                                  1] if i < self.num_stages -
                1 else None,
                block_cfg=block_cfg) for i, depth in enumerate(self.depths)
        ])
        self._add_output_norms()

    @classmethod
    def _check_family_arguments(cls, args: Dict[str, Any]) -> None:
        """Validate ``window_size`` and ``patch_size``.

        Args:
            args (dict): The arguments, by name.
        """
        super()._check_family_arguments(args)
        check_int(args['window_size'], 'window_size', cls.__name__)
        check_int(args['patch_size'], 'patch_size', cls.__name__)

    @staticmethod
    def has_fsla(stage: int, block: int, num_stages: int) -> bool:
        """Whether a block holds FSLA: the shifted (odd) blocks of all
        stages but the last.

        Args:
            stage (int): Index of the stage.
            block (int): Index of the block in its stage.
            num_stages (int): Number of stages of the backbone.

        Returns:
            bool: True if the block has an FSLA residual.
        """
        return block % 2 == 1 and stage < num_stages - 1

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        return self.patch_embed(x)

    def _post_embed(self, x: Tensor) -> Tensor:
        # After the mask tokens, as in mmpretrain's SimMIM Swin.
        return self.drop_after_pos(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args,
                              **kwargs):
        # mmcls-era Swin checkpoints (state-dict version None or 1, before
        # mmpretrain's version 2) store the final norm as ``norm.*``: it is
        # the last stage's output norm, as mmpretrain's Swin renames it.
        version = local_metadata.get('version')
        if version is None or version < 2:
            old = prefix + 'norm.'
            new = f'{prefix}norm{self.num_stages - 1}.'
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[new + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      *args, **kwargs)


class BOATSwinPublished(PublishedLayout):
    """The published BOAT-Swin checkpoints (``BOAT-Swin/models/
    boat_swin_transformer.py`` of the public code, weights under
    ``model``); plain Swin files (no ``attnC``) too: the official Swin
    code's and timm's.

    Blocks are ``layers.{i}.blocks.{j}``, merges ``layers.{i}.downsample``
    (after stage ``i``), whose 2x2 features are ordered as Swin's
    ``PatchMerging`` concatenates them (see :func:`swin_merge_order`).
    timm (>= 0.9) keeps the merge after stage ``i`` as
    ``layers.{i + 1}.downsample`` (same feature order) and the classifier
    as ``head.fc``; :meth:`detect` tells the two apart.
    """
    _BLOCK_KEY = r'layers\.(\d+)\.blocks\.(\d+)\.'
    # Published block module -> ours; the FSLA ones (attnC, norm4) only in
    # the blocks that have FSLA.
    _BLOCK_MODULES = (('norm1', 'norm1'), ('attn.qkv', 'attn.w_msa.qkv'),
                      ('attn.proj', 'attn.w_msa.proj'), ('norm2', 'norm2'),
                      ('mlp.fc1', 'ffn.layers.0.0'), ('mlp.fc2',
                                                      'ffn.layers.1'))
    _FSLA_MODULES = (('norm4', 'norm_fsla'), ('attnC.qkv', 'fsla.qkv'),
                     ('attnC.proj', 'fsla.proj'), ('attnC.get_v',
                                                   'fsla.get_v'))

    def detect(self, state_dict: Mapping[str, Tensor]) -> dict:
        """Describe a BOAT-Swin (or plain Swin) checkpoint.

        Args:
            state_dict (Mapping[str, Tensor]): Weights in this layout.

        Returns:
            dict: ``arch`` ('tiny', 'small', 'base', or None for other
            settings), ``embed_dims`` (per stage, from the blocks' norms),
            ``depths``, ``num_heads`` (from the position-bias tables),
            ``window_size``, ``patch_size``, ``in_channels``,
            ``with_fsla``, ``num_classes`` (None without a head), and
            where the layout keeps the merges and the classifier:
            ``merge_first`` (True for timm's ``layers.{i + 1}.downsample``)
            and ``head`` (``'head'`` or timm's ``'head.fc'``).
        """
        stem = 'patch_embed.proj.weight'
        if stem not in state_dict:
            raise KeyError(f'Not a BOAT-Swin checkpoint: {stem!r} is '
                           f'missing; first keys: {list(state_dict)[:5]}.')
        blocks = blocks_per_stage(state_dict, self._BLOCK_KEY)
        num_layers = max(blocks, default=-1) + 1
        if not num_layers or len(blocks) != num_layers:
            raise KeyError(f'BOAT-Swin checkpoint without blocks for some '
                           f'stage: blocks per stage {blocks}.')
        widths, heads, window = [], [], 0
        for s in range(num_layers):
            block = f'layers.{s}.blocks.0'
            table = state_dict.get(
                f'{block}.attn.relative_position_bias_table')
            norm = state_dict.get(f'{block}.norm1.weight')
            if table is None or norm is None:
                raise KeyError(f'BOAT-Swin checkpoint without the norm1 or '
                               f'the position-bias table of {block}.')
            widths.append(int(norm.shape[0]))
            heads.append(int(table.shape[1]))
            # (2 * window - 1) ** 2 rows.
            window = (int(round(table.shape[0]**0.5)) + 1) // 2
        embed = state_dict[stem]
        head_name = 'head.fc' if 'head.fc.weight' in state_dict else 'head'
        head = state_dict.get(f'{head_name}.weight')
        depths = tuple(blocks[s] for s in range(num_layers))
        # The last stage has no merge after it: a merge stored under it is
        # timm's, stored with the stage it feeds.
        merge_first = any(
            str(k).startswith(f'layers.{num_layers - 1}.downsample.')
            for k in state_dict)
        return dict(
            arch=self.backbone.zoo_name(
                embed_dims=widths, depths=depths, num_heads=heads),
            embed_dims=widths,
            depths=depths,
            num_heads=tuple(heads),
            window_size=window,
            patch_size=int(embed.shape[-1]),
            in_channels=int(embed.shape[1]),
            with_fsla=any('.attnC.' in k for k in state_dict),
            num_classes=None if head is None else int(head.shape[0]),
            merge_first=merge_first,
            head=head_name)

    def backbone_cfg(self, info: dict) -> dict:
        """The backbone arguments for a published checkpoint.

        Args:
            info (dict): The checkpoint, as :meth:`detect` describes it.

        Returns:
            dict: Arguments (without ``type``) of the backbone; ``arch``
            is a dict of the settings when they match no zoo entry.
        """
        custom = dict(
            embed_dims=list(info['embed_dims']),
            depths=list(info['depths']),
            num_heads=list(info['num_heads']))
        cfg = super().backbone_cfg(info)
        cfg.update(
            arch=info['arch'] or custom,
            patch_size=info['patch_size'],
            window_size=info['window_size'])
        return cfg

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
        for i in range(info['depths'][stage]):
            src = f'layers.{stage}.blocks.{i}'
            dst = f'backbone.stages.{stage}.blocks.{i}'
            names[f'{src}.attn.relative_position_bias_table'] = \
                f'{dst}.attn.w_msa.relative_position_bias_table'
            modules = self._BLOCK_MODULES
            if info['with_fsla'] and self.backbone.has_fsla(stage, i, num):
                modules += self._FSLA_MODULES
            for a, b in modules:
                add_module_keys(names, f'{src}.{a}', f'{dst}.{b}')
        if stage < num - 1:
            merge = stage + int(info.get('merge_first', False))
            src = f'layers.{merge}.downsample'
            dst = f'backbone.stages.{stage}.downsample'
            add_module_keys(names, f'{src}.norm', f'{dst}.norm')
            add_module_keys(names, f'{src}.reduction', f'{dst}.reduction',
                            ('weight', ))

    def fix_value(self, key: str, value: Tensor) -> Tensor:
        """Reorder the patch merging's features from Swin's to mmcv's.

        mmcv's ``PatchMerging`` orders the 2x2 features differently (see
        :func:`swin_merge_order`).

        Args:
            key (str): The boat-mm key.
            value (Tensor): The published tensor.

        Returns:
            Tensor: ``value`` as boat-mm stores it.
        """
        if key.endswith('.downsample.reduction.weight'):
            return value[:, swin_merge_order(value.shape[1])]
        if '.downsample.norm.' in key:
            return value[swin_merge_order(value.shape[0])]
        return value


# yapf: disable
BOATSwin.published = BOATSwinPublished(
    BOATSwin, 'BOAT-Swin', marker='layers.',
    stem=('patch_embed.proj', 'patch_embed.norm'),
    code=('BOAT-Swin', 'models/boat_swin_transformer.py'),
    plain_name='Swin (official or timm)')
# yapf: enable
