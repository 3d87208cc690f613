# Copyright (c) boat-mm contributors. All rights reserved.
"""CSWin cross-shaped window self-attention with LePE (Dong et al., CVPR
2022; https://github.com/microsoft/CSWin-Transformer), the image-space
local attention of BOAT-CSWin, written for boat-mm.

The channels and heads of a block are split into two halves: the first
attends inside vertical stripes (full height, ``split_size`` columns), the
second inside horizontal stripes (``split_size`` rows, full width). The last
stage uses one branch over the whole map. LePE, a depthwise 3x3 convolution
of the values of each stripe (zero padded at the stripe border), is added to
the attention output before the output projection.

Any ``H x W`` works. A map whose size is not a multiple of the stripe width
is padded symmetrically (``pad // 2`` before, the rest after, as the CSWin
segmentation code does) and cropped back. Unlike that code, padded slots are
masked out as keys, so on real tokens the result does not depend on the
padding: it equals stripe attention where the first and last stripes are
narrower.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from .arch import check_heads, check_tokens
from .depthwise import DepthwiseConv2d

__all__ = ['LePEStripeAttention', 'CSWinAttention', 'stripe_window_labels']


def stripe_window_labels(hw_shape: Sequence[int],
                         windows: Sequence[Tuple[int, int]]) -> Tensor:
    """Window of every token for CSWin-style ``(h_sp, w_sp)`` windows.

    Each window shape tiles the map padded symmetrically (``pad // 2``
    before), as :class:`LePEStripeAttention` does.

    Args:
        hw_shape (Sequence[int]): ``(H, W)``.
        windows (Sequence[tuple[int, int]]): One window shape per branch,
            e.g. ``[(H, 7), (7, W)]`` for vertical and horizontal stripes.

    Returns:
        Tensor: ``(len(windows), N)`` labels; a token's window is the union
        over branches of the tokens sharing its label.
    """
    H, W = (int(n) for n in hw_shape)
    out = []
    for hs, ws in windows:
        top, left = (-H % hs) // 2, (-W % ws) // 2
        rows = (torch.arange(H) + top) // hs
        cols = (torch.arange(W) + left) // ws
        out.append((rows[:, None] * (cols.max() + 1) + cols).view(-1))
    return torch.stack(out)


class LePEStripeAttention(nn.Module):
    """Self-attention inside stripes (or the whole map) plus the LePE term.

    Args:
        embed_dims (int): Channels of this branch.
        num_heads (int): Heads of this branch; must divide ``embed_dims``.
        mode (str): ``'vertical'`` (stripes of ``split_size`` columns, full
            height), ``'horizontal'`` (``split_size`` rows, full width) or
            ``'full'`` (the whole map is one window).
        split_size (int): Stripe width; ignored for ``'full'``.
            Defaults to 7.
        qk_scale (float, optional): Logit scale; None for
            ``head_dim ** -0.5``. Defaults to None.
        attn_drop (float): Dropout on attention weights. Defaults to 0.
    """

    modes = ('vertical', 'horizontal', 'full')

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 mode: str,
                 split_size: int = 7,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.) -> None:
        super().__init__()
        if mode not in self.modes:
            raise ValueError(
                f'mode must be one of {self.modes}, got {mode!r}.')
        check_heads(embed_dims, num_heads, type(self).__name__)
        if mode != 'full' and split_size < 1:
            raise ValueError(f'split_size must be >= 1, got {split_size}.')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.mode = mode
        self.split_size = split_size
        self.scale = (embed_dims // num_heads)**-0.5 \
            if qk_scale is None else qk_scale
        self.attn_drop = attn_drop
        # LePE: positional term from the values, one 3x3 filter per channel.
        self.get_v = DepthwiseConv2d(embed_dims)

    def window_shape(self, hw_shape: Sequence[int]) -> Tuple[int, int]:
        """The window size used for a map.

        Args:
            hw_shape (Sequence[int]): ``(H, W)`` of the map.

        Returns:
            tuple[int, int]: ``(H_sp, W_sp)``.
        """
        H, W = hw_shape
        if self.mode == 'full':
            return H, W
        if self.mode == 'vertical':
            return H, self.split_size
        return self.split_size, W

    def forward(self, qkv: Tensor) -> Tensor:
        """Attend inside stripes.

        Args:
            qkv (Tensor): ``(B, H, W, 3, C)``: queries, keys and values of
                this branch in image layout.

        Returns:
            Tensor: ``(B, H, W, C)``.
        """
        if qkv.dim() != 5 or qkv.shape[3] != 3 \
                or qkv.shape[4] != self.embed_dims:
            raise ValueError(
                f'expected qkv of shape (B, H, W, 3, {self.embed_dims}), '
                f'got {tuple(qkv.shape)}.')
        B, H, W, _, C = qkv.shape
        nh_, d = self.num_heads, C // self.num_heads
        hs, ws = self.window_shape((H, W))
        pad_h, pad_w = (hs - H % hs) % hs, (ws - W % ws) % ws
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            qkv = F.pad(qkv,
                        (0, 0, 0, 0, left, pad_w - left, top, pad_h - top))
        Hp, Wp = H + pad_h, W + pad_w
        nh, nw = Hp // hs, Wp // ws
        nwin, L = B * nh * nw, hs * ws

        # (B, Hp, Wp, 3, C) -> (3, B*nwin, L, C), raster order in a window.
        win = qkv.view(B, nh, hs, nw, ws, 3, C).permute(5, 0, 1, 3, 2, 4, 6)
        win = win.reshape(3, nwin, L, C)
        q, k, v = (t.view(nwin, L, nh_, d).transpose(1, 2) for t in win)
        # LePE on each stripe as its own image (zeros beyond its border).
        lepe = self.get_v(win[2].view(nwin, hs, ws, C).permute(0, 3, 1, 2))
        lepe = lepe.reshape(nwin, nh_, d, L).transpose(2, 3)

        mask = None
        if pad_h or pad_w:
            real = qkv.new_zeros(Hp, Wp, dtype=torch.bool)
            real[top:top + H, left:left + W] = True
            real = real.view(nh, hs, nw, ws).transpose(1, 2).reshape(-1, L)
            # Padded slots are never keys: (nwin, 1, 1, L), True = attend.
            mask = real.expand(B, -1, -1).reshape(nwin, 1, 1, L)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.,
            scale=self.scale)
        out = (out + lepe).transpose(1, 2).reshape(B, nh, nw, hs, ws, C)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            out = out[:, top:top + H, left:left + W]
        return out

    def extra_repr(self) -> str:
        """The settings shown in the module's repr.

        Returns:
            str: ``embed_dims``, ``num_heads``, the layout and the scale.
        """
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'mode={self.mode}, split_size={self.split_size}, '
                f'scale={self.scale:.4g}')


class CSWinAttention(BaseModule):
    """Cross-shaped window attention: qkv, branches, output projection.

    With ``full_map=False`` the channels and heads are split in half between
    a vertical-stripe and a horizontal-stripe branch (CSWin stages 1-3);
    with ``full_map=True`` one branch attends over the whole map (stage 4).

    Args:
        embed_dims (int): Channels ``C``.
        num_heads (int): Heads; split evenly between the two branches.
        split_size (int): Stripe width. Defaults to 7.
        full_map (bool): One branch over the whole map. Defaults to False.
        qkv_bias (bool): Bias of the qkv projection. Defaults to True.
        qk_scale (float, optional): Logit scale; None for
            ``head_dim ** -0.5`` (``head_dim = C / num_heads`` in both
            cases). Defaults to None.
        attn_drop (float): Dropout on attention weights. Defaults to 0.
        proj_drop (float): Dropout after the projection. Defaults to 0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 split_size: int = 7,
                 full_map: bool = False,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        check_heads(embed_dims, num_heads, type(self).__name__)
        if not full_map and num_heads % 2:
            raise ValueError(
                f'CSWin splits the heads between two stripe branches, so '
                f'num_heads must be even, got {num_heads} (or use '
                f'full_map=True).')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.full_map = full_map
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        if full_map:
            self.branches = nn.ModuleList([
                LePEStripeAttention(embed_dims, num_heads, 'full', split_size,
                                    qk_scale, attn_drop)
            ])
        else:
            self.branches = nn.ModuleList([
                LePEStripeAttention(embed_dims // 2, num_heads // 2, mode,
                                    split_size, qk_scale, attn_drop)
                for mode in ('vertical', 'horizontal')
            ])
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def window_labels(self, hw_shape: Sequence[int]) -> Tensor:
        """Windows of every token of an ``(H, W)`` map, one row per
        branch, for analysis (:func:`stripe_window_labels`).

        Args:
            hw_shape (Sequence[int]): ``(H, W)``.

        Returns:
            Tensor: ``(num_branches, N)`` int64 labels.
        """
        return stripe_window_labels(
            hw_shape, [b.window_shape(hw_shape) for b in self.branches])

    def forward(self, x: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward.

        Args:
            x (Tensor): ``(B, N, C)`` tokens in raster order.
            hw_shape (Sequence[int]): ``(H, W)`` with ``H * W == N``.

        Returns:
            Tensor: ``(B, N, C)``.
        """
        check_tokens(x, hw_shape, self.embed_dims, type(self).__name__)
        B, N, C = x.shape
        H, W = hw_shape
        qkv = self.qkv(x).view(B, H, W, 3, C)
        if self.full_map:
            out = self.branches[0](qkv)
        else:
            half = C // 2
            halves = (qkv[..., :half], qkv[..., half:])
            out = torch.cat(
                [branch(t) for branch, t in zip(self.branches, halves)],
                dim=-1)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))
