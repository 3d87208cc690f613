# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT-Swin: Swin Transformer with feature-space local attention."""
from types import ModuleType
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import PatchEmbed, PatchMerging
from mmengine.model import BaseModule, ModuleList
from mmpretrain.models.utils.attention import ShiftWindowMSA
from torch import Tensor

from boat_mm.registry import MODELS
from ..utils.ckpt_convert import add_module_keys, blocks_per_stage
from .base_boat import BaseBOATBackbone, BaseBOATBlock

__all__ = [
    'BOATSwin', 'BOATSwinBlock', 'BOATSwinStage', 'BOATShiftWindowMSA',
    'swin_merge_order'
]


class BOATShiftWindowMSA(ShiftWindowMSA):
    """(Shifted) window attention with relative position bias, any map size.

    mmpretrain's :class:`ShiftWindowMSA` (and its ``WindowMSA``, so the
    parameters are ``w_msa.{qkv,proj,relative_position_bias_table}``) with
    two changes to its size handling:

    - As in the original Swin/BOAT-Swin, the shift is off when the shorter
      side of the map is not longer than the window (e.g. the 7x7 last stage
      at 224 pixels), so the published classifiers are reproduced exactly.
      Smaller maps are padded instead of shrinking the window, so any input
      size works with the trained position-bias table.
    - The map is padded at the bottom/right to window multiples and cropped
      back, like mmseg's Swin, but the padded tokens are masked: they are
      never keys of real tokens, so a real token's output does not depend
      on how much padding its window got.

    The ``relative_position_index`` buffer is not saved in state dicts (it
    is derived from the window size).

    Args:
        embed_dims (int): Channels.
        num_heads (int): Heads.
        window_size (int): Window side.
        shift_size (int): Shift of the shifted-window blocks, 0 for plain
            window attention. Defaults to 0.
        dropout_layer (dict): Applied to the output (stochastic depth).
        init_cfg (dict, optional): Initialisation config.
        **kwargs: ``qkv_bias``, ``qk_scale``, ``attn_drop``, ``proj_drop``
            of :class:`mmpretrain.models.utils.WindowMSA`.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int,
                 shift_size: int = 0,
                 dropout_layer: dict = dict(type='DropPath', drop_prob=0.),
                 init_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(
            embed_dims,
            num_heads,
            window_size,
            shift_size=shift_size,
            dropout_layer=dropout_layer,
            init_cfg=init_cfg,
            **kwargs)
        # Keep the index out of checkpoints: it is derived, not learnt.
        self.w_msa.register_buffer(
            'relative_position_index',
            self.w_msa.relative_position_index,
            persistent=False)

    @staticmethod
    def _window_mask(hw_shape: Tuple[int, int], pad_shape: Tuple[int, int],
                     window_size: int, shift_size: int,
                     device: torch.device) -> Optional[Tensor]:
        """Additive ``(num_windows, ws*ws, ws*ws)`` mask, None if not needed.

        Tokens may attend each other only if they lie in the same region of
        the rolled map (Swin's shift mask) and are both real or both padding.
        """
        H, W = hw_shape
        Hp, Wp = pad_shape
        if not shift_size and (H, W) == (Hp, Wp):
            return None
        ws, s = window_size, shift_size

        def regions(size: int) -> Tensor:
            # Swin's slices [0, size-ws), [size-ws, size-s), [size-s, size).
            idx = torch.arange(size, device=device)
            if not s:
                return torch.zeros_like(idx)
            return (idx >= size - ws).long() + (idx >= size - s).long()

        def padded(size: int, real: int) -> Tensor:
            # Padding flags in rolled coordinates (roll by -s).
            flags = torch.arange(size, device=device) >= real
            return torch.roll(flags, -s) if s else flags

        region = regions(Hp)[:, None] * 3 + regions(Wp)[None, :]
        pad = padded(Hp, H)[:, None] | padded(Wp, W)[None, :]
        label = (region * 2 + pad.long()).float()
        windows = ShiftWindowMSA.window_partition(label[None, :, :, None],
                                                  ws).view(-1, ws * ws)
        diff = windows[:, None, :] - windows[:, :, None]
        return diff.ne(0).float() * -100.

    def forward(self, query: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward ``(B, H*W, C)`` tokens of an ``(H, W)`` map."""
        B, L, C = query.shape
        H, W = hw_shape
        if L != H * W:
            raise ValueError(f'{L} tokens do not match the map shape '
                             f'{tuple(hw_shape)}.')
        ws = self.window_size
        # As the original: one window spans the shorter side -> no shift.
        shift = self.shift_size if min(H, W) > ws else 0
        pad_b, pad_r = -H % ws, -W % ws
        x = query.view(B, H, W, C)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = self._window_mask((H, W), (Hp, Wp), ws, shift, query.device)
        if mask is not None:
            mask = mask.to(query.dtype)  # -100 fits half precision too
        windows = self.window_partition(x, ws).view(-1, ws * ws, C)
        windows = self.w_msa(windows, mask=mask)
        # Not mmpretrain's window_reverse: its batch size int(n / float)
        # becomes a constant under torch.export (a dynamic-batch ONNX file
        # then mixes samples for other batch sizes).
        x = windows.view(B, Hp // ws, Wp // ws, ws, ws, C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W].reshape(B, H * W, C)
        return self.drop(x)


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
                 **kwargs) -> None:
        super().__init__(
            embed_dims,
            num_heads,
            attn_cfg=dict(window_size=window_size, shift=shift),
            **kwargs)

    def _build_attention(self, embed_dims: int, num_heads: int,
                         window_size: int, shift: bool,
                         **kwargs) -> nn.Module:
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
        downsample (bool): End with mmcv's ``PatchMerging`` (2x2 -> 2C).
        block_cfg (dict): Remaining :class:`BOATSwinBlock` arguments.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 drop_path_rates: Sequence[float],
                 fsla_blocks: Sequence[bool],
                 downsample: bool,
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
        if downsample:
            self.downsample = PatchMerging(
                in_channels=embed_dims,
                out_channels=2 * embed_dims,
                norm_cfg=block_cfg.get('norm_cfg', dict(type='LN')),
                bias=False)
        else:
            self.downsample = None

    def forward(
        self, x: Tensor, hw_shape: Sequence[int]
    ) -> Tuple[Tensor, Tuple[int, int], Tensor, Tuple[int, int]]:
        """Returns the merged tokens and shape, then the stage's own."""
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
    published_name = 'BOAT-Swin'
    published_marker = 'layers.'
    published_stem = ('patch_embed.proj', 'patch_embed.norm')
    published_code = ('BOAT-Swin', 'models/boat_swin_transformer.py')
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {
            'embed_dims': 96,
            'depths': [2, 2, 6, 2],
            'num_heads': [3, 6, 12, 24]
        }),
        **dict.fromkeys(['s', 'small'], {
            'embed_dims': 96,
            'depths': [2, 2, 18, 2],
            'num_heads': [3, 6, 12, 24]
        }),
        **dict.fromkeys(['b', 'base'], {
            'embed_dims': 128,
            'depths': [2, 2, 18, 2],
            'num_heads': [4, 8, 16, 32]
        }),
    }
    # Buffers that older or foreign checkpoints may carry; boat-mm derives
    # them.
    derived_buffers = ('relative_position_index', 'attn_mask')

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 patch_size: int = 4,
                 in_channels: int = 3,
                 window_size: int = 7,
                 **kwargs) -> None:
        super().__init__(arch=arch, in_channels=in_channels, **kwargs)
        if window_size < 1 or patch_size < 1:
            raise ValueError(f'window_size ({window_size}) and patch_size '
                             f'({patch_size}) must be positive.')
        # 'corner' padding: any input size, ceil(H / patch_size) rows.
        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.embed_dims,
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
                downsample=i < self.num_stages - 1,
                block_cfg=block_cfg) for i, depth in enumerate(self.depths)
        ])
        self._add_output_norms()

    @staticmethod
    def has_fsla(stage: int, block: int, num_stages: int) -> bool:
        """FSLA in the shifted (odd) blocks of all stages but the last."""
        return block % 2 == 1 and stage < num_stages - 1

    def _parse_arch(self, arch: Union[str, dict]) -> Dict:
        settings = super()._parse_arch(arch)
        for i, heads in enumerate(settings['num_heads']):
            dims = settings['embed_dims'] * 2**i
            if dims % heads:
                raise ValueError(
                    f'BOATSwin arch: stage {i} has {dims} channels, not '
                    f'divisible by its {heads} heads.')
        return settings

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x, hw_shape = self.patch_embed(x)
        return self.drop_after_pos(x), hw_shape

    # --- The published checkpoints (BOAT-Swin/models/
    # boat_swin_transformer.py: weights under ``model``). ---

    _BLOCK_KEY = r'layers\.(\d+)\.blocks\.(\d+)\.'
    # Published block module -> ours; the FSLA ones (attnC, norm4) only in
    # the blocks that have FSLA.
    _BLOCK_MODULES = (('norm1', 'norm1'), ('attn.qkv', 'attn.w_msa.qkv'),
                      ('attn.proj', 'attn.w_msa.proj'), ('norm2', 'norm2'),
                      ('mlp.fc1', 'ffn.layers.0.0'),
                      ('mlp.fc2', 'ffn.layers.1'))
    _FSLA_MODULES = (('norm4', 'norm_fsla'), ('attnC.qkv', 'fsla.qkv'),
                     ('attnC.proj', 'fsla.proj'),
                     ('attnC.get_v', 'fsla.get_v'))

    @classmethod
    def detect_published(cls, state_dict: Mapping[str, Tensor]) -> dict:
        """Describe a BOAT-Swin (or plain Swin) checkpoint.

        Returns:
            dict: ``arch`` ('tiny', 'small', 'base', or None for other
            settings), ``embed_dims``, ``depths``, ``num_heads`` (from the
            position-bias tables), ``window_size``, ``patch_size``,
            ``in_channels``, ``with_fsla`` and ``num_classes`` (None
            without a head).
        """
        stem = 'patch_embed.proj.weight'
        if stem not in state_dict:
            raise KeyError(f'Not a BOAT-Swin checkpoint: {stem!r} is '
                           f'missing; first keys: {list(state_dict)[:5]}.')
        blocks = blocks_per_stage(state_dict, cls._BLOCK_KEY)
        num_layers = max(blocks, default=-1) + 1
        if not num_layers or len(blocks) != num_layers:
            raise KeyError(f'BOAT-Swin checkpoint without blocks for some '
                           f'stage: blocks per stage {blocks}.')
        heads, window = [], 0
        for s in range(num_layers):
            table = state_dict.get(
                f'layers.{s}.blocks.0.attn.relative_position_bias_table')
            if table is None:
                raise KeyError(f'BOAT-Swin checkpoint without the position-'
                               f'bias table of stage {s}.')
            heads.append(int(table.shape[1]))
            # (2 * window - 1) ** 2 rows.
            window = (int(round(table.shape[0]**0.5)) + 1) // 2
        embed = state_dict[stem]
        head = state_dict.get('head.weight')
        depths = tuple(blocks[s] for s in range(num_layers))
        return dict(
            arch=cls.zoo_name(
                embed_dims=int(embed.shape[0]),
                depths=depths,
                num_heads=heads),
            embed_dims=int(embed.shape[0]),
            depths=depths,
            num_heads=tuple(heads),
            window_size=window,
            patch_size=int(embed.shape[-1]),
            in_channels=int(embed.shape[1]),
            with_fsla=any('.attnC.' in k for k in state_dict),
            num_classes=None if head is None else int(head.shape[0]))

    @classmethod
    def published_backbone_cfg(cls, info: dict) -> dict:
        custom = dict(
            embed_dims=info['embed_dims'],
            depths=list(info['depths']),
            num_heads=list(info['num_heads']))
        cfg = super().published_backbone_cfg(info)
        cfg.update(
            arch=info['arch'] or custom,
            patch_size=info['patch_size'],
            window_size=info['window_size'])
        return cfg

    @classmethod
    def _add_published_stage_keys(cls, names: Dict[str, str],
                                  stage: int, info: dict) -> None:
        num = len(info['depths'])
        for i in range(info['depths'][stage]):
            src = f'layers.{stage}.blocks.{i}'
            dst = f'backbone.stages.{stage}.blocks.{i}'
            names[f'{src}.attn.relative_position_bias_table'] = \
                f'{dst}.attn.w_msa.relative_position_bias_table'
            modules = cls._BLOCK_MODULES
            if info['with_fsla'] and cls.has_fsla(stage, i, num):
                modules += cls._FSLA_MODULES
            for a, b in modules:
                add_module_keys(names, f'{src}.{a}', f'{dst}.{b}')
        if stage < num - 1:
            src = f'layers.{stage}.downsample'
            dst = f'backbone.stages.{stage}.downsample'
            add_module_keys(names, f'{src}.norm', f'{dst}.norm')
            add_module_keys(names, f'{src}.reduction', f'{dst}.reduction',
                            ('weight', ))

    @classmethod
    def build_published_model(cls, module: ModuleType,
                              arch: str) -> nn.Module:
        return module.SwinTransformer(
            img_size=224,
            window_size=7,
            drop_path_rate=0.,
            embed_dim=cls.arch_zoo[arch]['embed_dims'],
            depths=cls.arch_zoo[arch]['depths'],
            num_heads=cls.arch_zoo[arch]['num_heads'])

    @classmethod
    def published_outputs(cls, ref: nn.Module, ours: nn.Module,
                          x: Tensor) -> Dict[str, Tuple[Tensor, Tensor]]:
        """The tokens after each stage (before its merging) and the
        logits."""
        feats = ours.backbone.forward_stages(x)
        theirs: Dict[str, Tensor] = {}
        hooks = [
            layer.blocks[-1].register_forward_hook(
                lambda m, args, out, i=i: theirs.__setitem__(i, out))
            for i, layer in enumerate(ref.layers)
        ]
        try:
            logits = ref(x)
        finally:
            for hook in hooks:
                hook.remove()
        out = {
            f'stage{i + 1}': (theirs[i], feat.flatten(2).transpose(1, 2))
            for i, feat in enumerate(feats)
        }
        out['logits'] = (logits, ours(x, mode='tensor'))
        return out

    @classmethod
    def _published_value(cls, key: str, value: Tensor) -> Tensor:
        # mmcv's PatchMerging orders the 2x2 features differently.
        if key.endswith('.downsample.reduction.weight'):
            return value[:, swin_merge_order(value.shape[1])]
        if '.downsample.norm.' in key:
            return value[swin_merge_order(value.shape[0])]
        return value
