# Copyright (c) boat-mm contributors. All rights reserved.
"""Swin's (shifted) window attention with relative position bias.

The W-MSA / SW-MSA of the Swin Transformer (Liu et al., ICCV 2021;
https://github.com/microsoft/Swin-Transformer), written for boat-mm, as
mmseg's and mmdet's Swin files keep their own, so that the models import
only torch, mmcv.cnn and mmengine. The parameter names are mmpretrain's
(``w_msa.{qkv,proj,relative_position_bias_table}``), so that mmpretrain,
BOAT-Swin and boat-mm checkpoints load unchanged; on maps that are window
multiples the arithmetic is mmpretrain's, operation for operation
(``tests/test_models/test_utils/test_window_attn.py`` checks it bit for
bit).
"""
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import build_dropout
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

__all__ = [
    'WindowMSA', 'BOATShiftWindowMSA', 'window_partition',
    'relative_position_index', 'resize_bias_table', 'swin_window_labels'
]

# Additive logit mask between tokens that must not attend each other
# (Swin's value; it fits half precision).
MASKED_LOGIT = -100.


def relative_position_index(window_size: Tuple[int, int]) -> Tensor:
    """Row of the bias table of every (query, key) pair of a window.

    Tokens ``i = (y_i, x_i)`` and ``j`` of a ``Wh x Ww`` window (raster
    order) use row ``(y_i - y_j + Wh - 1) * (2 * Ww - 1) + x_i - x_j +
    Ww - 1`` of the ``(2 * Wh - 1) * (2 * Ww - 1)`` row table.

    Args:
        window_size (tuple[int, int]): ``(Wh, Ww)``.

    Returns:
        Tensor: ``(Wh * Ww, Wh * Ww)`` int64.
    """
    wh, ww = window_size
    y, x = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')
    y, x = y.flatten(), x.flatten()
    dy = y[:, None] - y[None, :] + wh - 1
    dx = x[:, None] - x[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def resize_bias_table(table: Tensor, size: Tuple[int, int]) -> Tensor:
    """A relative position bias table of a square window, resized.

    Args:
        table (Tensor): ``(S * S, heads)``, rows in raster order of the
            ``(2 * Wh - 1) x (2 * Ww - 1)`` offsets (``S = 2 * Wh - 1``).
        size (tuple[int, int]): The offsets of the new window,
            ``(2 * Wh' - 1, 2 * Ww' - 1)``.

    Returns:
        Tensor: ``(size[0] * size[1], heads)``, bicubic.
    """
    rows, heads = table.shape
    side = round(rows**0.5)
    grid = table.float().t().reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=size, mode='bicubic', align_corners=False)
    return grid.reshape(heads, -1).t().to(table.dtype).contiguous()


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Split a map into windows.

    Args:
        x (Tensor): ``(B, H, W, C)`` map, ``H`` and ``W`` multiples of
            ``window_size``.
        window_size (int): Window side ``ws``.

    Returns:
        Tensor: ``(B * H / ws * W / ws, ws * ws, C)`` windows, batch-major,
        windows in raster order, tokens in raster order inside each window.
    """
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


class WindowMSA(BaseModule):
    """Multi-head self-attention inside windows, with relative position
    bias (Swin's W-MSA).

    Args:
        embed_dims (int): Channels.
        window_size (int | tuple[int, int]): Window height and width.
        num_heads (int): Heads.
        qkv_bias (bool): Bias of the qkv projection. Defaults to True.
        qk_scale (float, optional): Logit scale; None (or 0, as mmpretrain)
            for ``head_dim ** -0.5``. Defaults to None.
        attn_drop (float): Dropout on attention weights. Defaults to 0.
        proj_drop (float): Dropout after the output projection.
            Defaults to 0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 window_size: Union[int, Tuple[int, int]],
                 num_heads: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(window_size, int):
            window_size = (window_size, window_size)
        self.embed_dims = embed_dims
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (embed_dims // num_heads)**-0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # Derived from the window size: kept out of checkpoints.
        self.register_buffer(
            'relative_position_index',
            relative_position_index(self.window_size),
            persistent=False)
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_weights(self) -> None:
        """``init_cfg``, then the bias table truncated normal (std 0.02)."""
        super().init_weights()
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._derive_index()

    def _derive_index(self) -> None:
        """Fill ``relative_position_index`` again from the window size.

        Checkpoints do not hold it, so a module built on the meta device
        and moved with ``to_empty`` (as FSDP does), or loaded with
        ``assign=True``, has none until its weights are initialised or
        loaded, which call this.
        """
        device = self.relative_position_bias_table.device
        if device.type == 'meta':
            return
        # Made outside inference mode: a buffer training can save.
        with torch.inference_mode(False):
            index = relative_position_index(self.window_size).to(device)
        own = self.relative_position_index
        if (own.device == device and own.shape == index.shape
                and own.dtype == index.dtype):
            # In place, and only where wrong (to_empty's memory): the
            # buffer stays the same tensor, and one of a module built
            # under inference_mode (an inference tensor, which cannot be
            # written outside it) is left alone.
            if not torch.equal(own, index):
                with torch.no_grad():
                    own.copy_(index)
        else:  # built on meta and assign=True, or cast by Module.type
            self.relative_position_index = index

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args,
                              **kwargs) -> None:
        """A bias table of another (square) window size, as a checkpoint
        trained with another ``window_size`` holds, is resized to this
        window's, bicubically, as mmseg's Swin does; the index is derived
        again (see `_derive_index`).

        Args:
            state_dict (dict): The weights being loaded.
            prefix (str): This module's prefix in them.
            *args, **kwargs: The rest of torch's arguments.
        """
        key = prefix + 'relative_position_bias_table'
        table = state_dict.get(key)
        own = self.relative_position_bias_table
        if (isinstance(table, Tensor) and table.dim() == 2
                and table.shape != own.shape
                and table.shape[1] == own.shape[1]):
            side = round(table.shape[0]**0.5)
            if side * side == table.shape[0] and side % 2 == 1:
                state_dict[key] = resize_bias_table(
                    table,
                    (2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive_index()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Attend within each window.

        Args:
            x (Tensor): ``(num_windows * B, Wh * Ww, C)`` tokens, windows
                batch-major.
            mask (Tensor, optional): ``(num_windows, Wh * Ww, Wh * Ww)``
                additive logit mask (0 or negative), the same for every
                sample. Defaults to None.

        Returns:
            Tensor: ``(num_windows * B, Wh * Ww, C)``.
        """
        B_, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(B_ // nw, nw, h, N, N) + mask[None, :, None]
            attn = attn.view(-1, h, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


def swin_window_labels(hw_shape: Sequence[int], window_size: int,
                       shift_size: int) -> Tensor:
    """Window of every token in (shifted) Swin window attention.

    As :class:`BOATShiftWindowMSA`: the map is padded at the bottom/right
    to window multiples, rolled by ``-shift`` (no shift when the shorter
    side is not longer than the window), cut into windows, and inside a
    window only tokens of the same region of the rolled map attend to
    each other.

    Args:
        hw_shape (Sequence[int]): ``(H, W)``.
        window_size (int): Window side.
        shift_size (int): Shift of the block, 0 for plain windows.

    Returns:
        Tensor: ``(1, N)`` int64 labels; two tokens share a window iff
        their labels are equal.
    """
    H, W = (int(n) for n in hw_shape)
    ws = window_size
    shift = shift_size if min(H, W) > ws else 0

    def axis(size: int) -> Tensor:
        padded = -(-size // ws) * ws
        rolled = (torch.arange(size) - shift) % padded
        region = torch.zeros_like(rolled)
        if shift:
            region = (rolled >= padded - ws).long() + (rolled >= padded -
                                                       shift).long()
        return rolled // ws * 3 + region

    rows, cols = axis(H), axis(W)
    return (rows[:, None] * (cols.max() + 1) + cols[None, :]).view(1, -1)


class BOATShiftWindowMSA(BaseModule):
    """(Shifted) window attention with relative position bias, any map size.

    Swin's SW-MSA (mmpretrain's ``ShiftWindowMSA`` parameters:
    ``w_msa.{qkv,proj,relative_position_bias_table}``) with this size
    handling:

    - As in the original Swin/BOAT-Swin, the shift is off when the shorter
      side of the map is not longer than the window (e.g. the 7x7 last stage
      at 224 pixels), so the published classifiers are reproduced exactly.
      Smaller maps are padded instead of shrinking the window, so any input
      size works with the trained position-bias table.
    - The map is padded at the bottom/right to window multiples and cropped
      back, like mmseg's Swin, but the padded tokens are masked: they are
      never keys of real tokens, so a real token's output does not depend
      on how much padding its window got.
    - The windows are put back with the batch size of the input, not one
      computed from the window count, so an exported graph keeps a
      symbolic batch (ONNX dynamic batch).

    Args:
        embed_dims (int): Channels.
        num_heads (int): Heads.
        window_size (int): Window side.
        shift_size (int): Shift of the shifted-window blocks, 0 for plain
            window attention; smaller than ``window_size``. Defaults to 0.
        dropout_layer (dict): Applied to the output (stochastic depth).
            Defaults to ``dict(type='DropPath', drop_prob=0.)``.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
        **kwargs: ``qkv_bias``, ``qk_scale``, ``attn_drop``, ``proj_drop``
            of :class:`WindowMSA`.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int,
                 shift_size: int = 0,
                 dropout_layer: dict = dict(type='DropPath', drop_prob=0.),
                 init_cfg: Optional[dict] = None,
                 **kwargs: Any) -> None:
        super().__init__(init_cfg=init_cfg)
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size ({shift_size}) must be in [0, '
                             f'window_size) = [0, {window_size}).')
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSA(
            embed_dims=embed_dims,
            window_size=(window_size, window_size),
            num_heads=num_heads,
            **kwargs)
        self.drop = build_dropout(dropout_layer)

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
        windows = window_partition(label[None, :, :, None],
                                   ws).view(-1, ws * ws)
        diff = windows[:, None, :] - windows[:, :, None]
        return diff.ne(0).float() * MASKED_LOGIT

    def window_labels(self, hw_shape: Sequence[int]) -> Tensor:
        """Window of every token of an ``(H, W)`` map, for analysis
        (:func:`swin_window_labels` of this window and shift).

        Args:
            hw_shape (Sequence[int]): ``(H, W)``.

        Returns:
            Tensor: ``(1, N)`` int64 labels.
        """
        return swin_window_labels(hw_shape, self.window_size, self.shift_size)

    def forward(self, query: Tensor, hw_shape: Sequence[int]) -> Tensor:
        """Forward.

        Args:
            query (Tensor): ``(B, H * W, C)`` tokens.
            hw_shape (Sequence[int]): ``(H, W)`` of the map.

        Returns:
            Tensor: ``(B, H * W, C)`` tokens.
        """
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
            mask = mask.to(query.dtype)
        windows = self.w_msa(window_partition(x, ws), mask=mask)
        # B from the input, not from the window count: the batch stays
        # symbolic under torch.export.
        x = windows.view(B, Hp // ws, Wp // ws, ws, ws, C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W].reshape(B, H * W, C)
        return self.drop(x)
