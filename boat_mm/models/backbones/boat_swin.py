# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT-Swin: Swin Transformer with feature-space local attention."""
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import FFN, PatchEmbed, PatchMerging
from mmengine.model import BaseModule, ModuleList
from mmengine.model.weight_init import constant_init, trunc_normal_init
from mmpretrain.models.utils.attention import ShiftWindowMSA
from torch import Tensor

from boat_mm.registry import MODELS
from ..utils import FeatureSpaceLocalAttention
from ..utils.arch import (FrozenStagesMixin, check_frozen_stages,
                          check_pretrained_file, fsla_settings,
                          parse_arch, parse_out_indices)

__all__ = ['BOATSwin', 'BOATSwinBlock', 'BOATSwinStage', 'BOATShiftWindowMSA']

# Buffers that older or foreign checkpoints may carry; boat-mm derives them.
_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')


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


class BOATSwinBlock(BaseModule):
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
        with_fsla (bool): Add FSLA after the window attention.
            Defaults to False.
        fsla_cfg (dict, optional): Extra :class:`FeatureSpaceLocalAttention`
            arguments. Defaults to None.
        mlp_ratio (float): FFN hidden ratio. Defaults to 4.
        qkv_bias (bool): Bias of the window attention qkv. Defaults to True.
        qk_scale (float, optional): Window attention scale; None for
            ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout after projections and in the FFN.
        attn_drop_rate (float): Dropout on attention weights.
        drop_path_rate (float): Stochastic depth of this block.
        act_cfg (dict): FFN activation. Defaults to GELU.
        norm_cfg (dict): Norm layers. Defaults to LN.
        with_cp (bool): Gradient checkpointing. Defaults to False.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int = 7,
                 shift: bool = False,
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
        drop_path = dict(type='BOATDropPath', drop_prob=drop_path_rate)
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = BOATShiftWindowMSA(
            embed_dims,
            num_heads,
            window_size,
            shift_size=window_size // 2 if shift else 0,
            dropout_layer=drop_path,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop_rate,
            proj_drop=drop_rate)
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
            dropout_layer=drop_path,
            act_cfg=act_cfg,
            add_identity=True)

    def forward(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward ``(B, N, C)`` tokens of a ``hw_shape`` map."""

        def _inner_forward(x: Tensor) -> Tensor:
            x = x + self.attn(self.norm1(x), hw_shape)
            if self.with_fsla:
                x = x + self.fsla(self.norm_fsla(x), hw_shape)
            return self.ffn(self.norm2(x), identity=x)

        if self.with_cp and torch.is_grad_enabled():
            # Non-reentrant: parameter grads flow even when x needs none
            # (frozen stem); the clustering is recomputed identically.
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


class BOATSwinStage(BaseModule):
    """BOAT-Swin blocks followed by an optional patch merging.

    Args:
        embed_dims (int): Channels of the blocks.
        depth (int): Number of blocks (even ones plain, odd ones shifted).
        num_heads (int): Heads per block.
        drop_path_rates (Sequence[float]): One rate per block.
        with_fsla (bool): FSLA in the shifted (odd) blocks.
        downsample (bool): End with mmcv's ``PatchMerging`` (2x2 -> 2C).
        block_cfg (dict): Remaining :class:`BOATSwinBlock` arguments.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 drop_path_rates: Sequence[float],
                 with_fsla: bool,
                 downsample: bool,
                 block_cfg: dict,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.blocks = ModuleList([
            BOATSwinBlock(
                embed_dims,
                num_heads,
                shift=i % 2 == 1,
                with_fsla=with_fsla and i % 2 == 1,
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


@MODELS.register_module()
class BOATSwin(FrozenStagesMixin, BaseModule):
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

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``,
            ``'s'``, ``'b'``), or a dict with ``embed_dims``, ``depths`` and
            ``num_heads``. Widths double at each stage.
            Defaults to ``'tiny'``.
        patch_size (int): Patch embedding stride and kernel. Defaults to 4.
        in_channels (int): Input channels. Defaults to 3.
        window_size (int): Window side. Defaults to 7.
        mlp_ratio (float): FFN hidden ratio. Defaults to 4.
        out_indices (Sequence[int] | int): Stages to output (negative counts
            from the end). Defaults to ``(0, 1, 2, 3)``.
        qkv_bias (bool): Bias of the qkv projections. Defaults to True.
        qk_scale (float, optional): Attention scale of the window attention
            and (unless ``fsla_cfg`` sets it) FSLA; None for
            ``head_dim ** -0.5``, as the published models. Defaults to None.
        drop_rate (float): Dropout after the patch embedding, projections
            and in the FFN. Defaults to 0.
        attn_drop_rate (float): Dropout on attention weights. Defaults to 0.
        drop_path_rate (float): Stochastic depth, growing linearly from 0 to
            this value over all blocks (published: T 0.2, S 0.3, B 0.5).
            Defaults to 0.1.
        with_fsla (bool): Add FSLA; False gives the plain Swin Transformer
            (no FSLA modules at all). Defaults to True.
        fsla_cfg (dict, optional): Passed to
            :class:`FeatureSpaceLocalAttention` (``group_size``,
            ``overlap``, ``kmeans_iters``, ``kmeans_temperature``,
            ``qk_scale``, ...). Defaults to None.
        act_cfg (dict): FFN activation. Defaults to GELU.
        norm_cfg (dict): Norm layers. Defaults to LN.
        frozen_stages (int): Freeze (stop grad, eval mode) the patch
            embedding when >= 0 and stages ``0 .. frozen_stages - 1`` (with
            the merging that ends them and their output norms), as mmseg's
            Swin. -1 freezes nothing. Defaults to -1.
        with_cp (bool): Gradient checkpointing of every block, to save
            memory at the cost of recomputation. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialisation config, e.g.
            ``dict(type='Pretrained', checkpoint=PATH, prefix='backbone.')``
            to load the backbone of a converted classifier checkpoint.
            Without it: truncated normal (std 0.02) Linear weights and
            position-bias tables, zero biases, unit LayerNorms, as the
            original. Defaults to None.

    Example:
        >>> import torch
        >>> from boat_mm.models import BOATSwin
        >>> model = BOATSwin(arch=dict(embed_dims=24, depths=(2, 2, 2, 2),
        ...                            num_heads=(1, 2, 2, 4)))
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 80))]
        [(1, 24, 16, 20), (1, 48, 8, 10), (1, 96, 4, 5), (1, 192, 2, 3)]
    """
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
    essential_keys = {'embed_dims', 'depths', 'num_heads'}

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 patch_size: int = 4,
                 in_channels: int = 3,
                 window_size: int = 7,
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
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = self.arch_settings['embed_dims']
        self.depths = list(self.arch_settings['depths'])
        self.num_heads = list(self.arch_settings['num_heads'])
        self.num_stages = len(self.depths)
        self.num_features = [
            self.embed_dims * 2**i for i in range(self.num_stages)
        ]
        self.out_indices = parse_out_indices(out_indices, self.num_stages)
        check_frozen_stages(frozen_stages, self.num_stages)
        if window_size < 1 or patch_size < 1:
            raise ValueError(f'window_size ({window_size}) and patch_size '
                             f'({patch_size}) must be positive.')
        self.frozen_stages = frozen_stages
        self.with_fsla = with_fsla
        # The original builds FSLA with the block's qkv_bias, scale, drops.
        self.fsla_cfg = fsla_settings(
            fsla_cfg,
            qk_scale=qk_scale,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop_rate,
            proj_drop=drop_rate)

        # 'corner' padding: any input size, ceil(H / patch_size) rows.
        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.embed_dims,
            conv_type='Conv2d',
            kernel_size=patch_size,
            stride=patch_size,
            padding='corner',
            norm_cfg=norm_cfg)
        self.drop_after_pos = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        block_cfg = dict(
            window_size=window_size,
            fsla_cfg=self.fsla_cfg,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            act_cfg=act_cfg,
            norm_cfg=norm_cfg,
            with_cp=with_cp)
        self.stages = ModuleList()
        for i, depth in enumerate(self.depths):
            last = i == self.num_stages - 1
            self.stages.append(
                BOATSwinStage(
                    embed_dims=self.num_features[i],
                    depth=depth,
                    num_heads=self.num_heads[i],
                    drop_path_rates=dpr[:depth],
                    # FSLA in the shifted blocks of all but the last stage.
                    with_fsla=with_fsla and not last,
                    downsample=not last,
                    block_cfg=block_cfg))
            dpr = dpr[depth:]

        for i in self.out_indices:
            self.add_module(
                f'norm{i}',
                build_norm_layer(norm_cfg, self.num_features[i])[1])
        self._freeze_stages()

    def _parse_arch(self, arch: Union[str, dict]) -> Dict:
        settings = parse_arch(arch, self.arch_zoo, self.essential_keys,
                              'BOATSwin')
        unknown = set(settings) - self.essential_keys
        if unknown:
            raise ValueError(
                f'Unknown keys {sorted(unknown)} in the BOATSwin arch dict; '
                f'it takes exactly {sorted(self.essential_keys)}.')
        settings = deepcopy(settings)
        n = len(settings['depths'])
        if n < 1 or len(settings['num_heads']) != n:
            raise ValueError(
                f'BOATSwin arch: depths and num_heads need one entry per '
                f'stage, got {settings["depths"]} and '
                f'{settings["num_heads"]}.')
        for i, heads in enumerate(settings['num_heads']):
            dims = settings['embed_dims'] * 2**i
            if dims % heads:
                raise ValueError(
                    f'BOATSwin arch: stage {i} has {dims} channels, not '
                    f'divisible by its {heads} heads.')
        return settings

    def init_weights(self) -> None:
        """Default initialisation, then ``init_cfg`` (pretrained last)."""
        check_pretrained_file(self.init_cfg, 'BOATSwin')
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_init(m, std=.02, bias=0.)
            elif isinstance(m, nn.LayerNorm):
                constant_init(m, val=1.0, bias=0.)
        # Children (mmpretrain's WindowMSA: trunc-normal position-bias
        # tables), then a Pretrained init_cfg overwrites what it loads.
        super().init_weights()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Derived buffers of the original or of mmpretrain's Swin are
        # recomputed here; drop them so strict loading accepts such files.
        for key in list(state_dict):
            if key.startswith(prefix) and key.endswith(_DERIVED_BUFFERS):
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Forward.

        Args:
            x (Tensor): ``(B, C, H, W)`` images, any ``H`` and ``W``.

        Returns:
            tuple[Tensor]: For each of ``out_indices``, a normed
            ``(B, C_i, H_i, W_i)`` map with ``H_i = ceil(H / 2**(i + 2))``
            (for ``patch_size=4``).
        """
        if x.dim() != 4:
            raise ValueError(
                f'BOATSwin expects images of shape (B, C, H, W), got a '
                f'tensor of shape {tuple(x.shape)}.')
        x, hw_shape = self.patch_embed(x)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, next_shape, out, hw_shape = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                out = out.transpose(1, 2).reshape(out.shape[0],
                                                  self.num_features[i],
                                                  *hw_shape)
                outs.append(out.contiguous())
            if i == self.out_indices[-1]:
                break  # later stages are not needed
            hw_shape = next_shape
        return tuple(outs)
