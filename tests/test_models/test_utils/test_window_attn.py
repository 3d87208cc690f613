# Copyright (c) boat-mm contributors. All rights reserved.
"""Our window attention against mmpretrain's, bit for bit.

boat_mm owns its W-MSA / SW-MSA (so that ``import boat_mm`` needs no
mmpretrain); mmpretrain is imported here only, as the reference:

* :class:`WindowMSA` equals mmpretrain's ``WindowMSA`` (same seed: same
  initial weights; same weights: same outputs, with or without a mask, in
  eval and in train mode with dropout drawn from the same seed);
* :class:`BOATShiftWindowMSA` equals mmpretrain's ``ShiftWindowMSA`` on
  maps that are window multiples (shifted and plain, train and eval,
  stochastic depth included), and on padded maps equals mmpretrain's
  ``ShiftWindowMSA`` given a mask built here from Swin's slices plus the
  padding (where ours masks the padding and mmpretrain's does not).
"""
import math

import pytest
import torch

from boat_mm.models.utils.window_attn import BOATShiftWindowMSA, WindowMSA

attention = pytest.importorskip('mmpretrain.models.utils.attention')
RefWindowMSA, RefShiftWindowMSA = attention.WindowMSA, attention.ShiftWindowMSA

DROPS = dict(attn_drop=0.2, proj_drop=0.1)


def _same_weights(ours, ref):
    """Load ``ref``'s weights into ``ours``; only the index buffer, which
    ours derives and does not save, is left over."""
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing
    assert all(k.endswith('relative_position_index') for k in unexpected)


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _run(module, x, *args, train, seed=0):
    module.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x, *args)


def test_window_msa_init_names_and_index():
    torch.manual_seed(3)
    ours = WindowMSA(12, (5, 4), 3)
    ours.init_weights()
    torch.manual_seed(3)
    ref = RefWindowMSA(12, (5, 4), 3)
    ref.init_weights()
    # Same draws in the same order: the initial weights are equal.
    ref_state = ref.state_dict()
    index = ref_state.pop('relative_position_index')
    assert list(ours.state_dict()) == list(ref_state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert torch.equal(ours.relative_position_index, index)


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('masked', [False, True])
def test_window_msa_equals_mmpretrain(train, masked):
    ref = RefWindowMSA(16, (4, 4), 2, **DROPS)
    ours = WindowMSA(16, 4, 2, **DROPS)
    _randomise(ref, 0)
    _same_weights(ours, ref)
    x = torch.randn(6, 16, 16)  # 3 windows x batch 2
    mask = None
    if masked:
        mask = (torch.rand(3, 16, 16) > 0.7).float() * -100.
    got = _run(ours, x, mask, train=train)
    want = _run(ref, x, mask, train=train)
    assert torch.equal(got, want)


# (H, W, window, shift): window multiples, shifted and plain, and a map
# whose shorter side is one window (no shift in either).
MULTIPLES = [(14, 14, 7, 3), (8, 12, 4, 2), (12, 8, 4, 0), (7, 14, 7, 3)]


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('hw_ws_shift', MULTIPLES)
def test_shift_window_msa_equals_mmpretrain(hw_ws_shift, train):
    H, W, ws, shift = hw_ws_shift
    drop = dict(type='DropPath', drop_prob=0.3)
    ref = RefShiftWindowMSA(
        16, 2, ws, shift_size=shift, dropout_layer=drop, **DROPS)
    ours = BOATShiftWindowMSA(
        16, 2, ws, shift_size=shift, dropout_layer=drop, **DROPS)
    _randomise(ref, 1)
    _same_weights(ours, ref)
    assert list(ours.state_dict()) == [
        k for k in ref.state_dict() if not k.endswith('position_index')
    ]
    x = torch.randn(3, H * W, 16)
    assert torch.equal(
        _run(ours, x, (H, W), train=train), _run(ref, x, (H, W), train=train))


def _padding_mask(H, W, ws, shift):
    """Swin's region mask (built from slices, as the original) of the
    rolled padded map, where padding is also a region of its own."""
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    region = torch.zeros(1, Hp, Wp, 1)
    if shift:
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
            region[:, h, w, :] = i
    pad = torch.zeros(1, Hp, Wp, 1)
    pad[:, H:] = 1
    pad[:, :, W:] = 1
    pad = torch.roll(pad, (-shift, -shift), dims=(1, 2))
    label = RefShiftWindowMSA.window_partition(region * 2 + pad, ws)
    label = label.view(-1, ws * ws)
    diff = label.unsqueeze(1) - label.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.).masked_fill(diff == 0, 0.)


# (H, W, window, shift): padded maps larger than a window (shifted; the
# padding is not one of Swin's shift regions, so it needs its own mask)
# and smaller than one (ours does not shift them, so neither does the ref).
PADDED = [(11, 16, 7, 3), (9, 6, 4, 2), (5, 6, 7, 0), (3, 9, 4, 0)]


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('hw_ws_shift', PADDED)
def test_padded_shift_window_msa_equals_mmpretrain_with_padding_masked(
        hw_ws_shift, train):
    H, W, ws, shift = hw_ws_shift
    drop = dict(type='DropPath', drop_prob=0.3)
    ref = RefShiftWindowMSA(
        16,
        2,
        ws,
        shift_size=shift,
        dropout_layer=drop,
        pad_small_map=True,
        **DROPS)
    ours = BOATShiftWindowMSA(
        16, 2, ws, shift_size=shift, dropout_layer=drop, **DROPS)
    _randomise(ref, 2)
    _same_weights(ours, ref)
    mask = _padding_mask(H, W, ws, shift)
    ref.get_attn_mask = lambda *args, **kwargs: mask
    # Batch 8: DropPath drops all of it with odds 0.3**8, where the
    # comparisons would see only zeros (2 samples were all dropped by
    # torch 2.4's draws).
    x = torch.randn(8, H * W, 16)
    got = _run(ours, x, (H, W), train=train)
    assert got.flatten(1).abs().sum(1).count_nonzero() > 0
    assert torch.equal(got, _run(ref, x, (H, W), train=train))
    # The padding matters: without its mask the outputs differ.
    del ref.get_attn_mask
    assert not torch.equal(got, _run(ref, x, (H, W), train=train))


def test_batch_stays_symbolic_under_export():
    """The batch of the windows' way back is the input's, so an exported
    program keeps a dynamic batch."""
    attn = BOATShiftWindowMSA(8, 2, 4, shift_size=2).eval()

    class OnMap(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, (8, 12))

    batch = torch.export.Dim('batch', min=1, max=8)
    program = torch.export.export(
        OnMap(), (torch.randn(2, 96, 8), ), dynamic_shapes=({
            0: batch
        }, ))
    x = torch.randn(3, 96, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), attn(x, (8, 12)))


def test_shift_must_be_smaller_than_window():
    with pytest.raises(ValueError, match='shift_size'):
        BOATShiftWindowMSA(8, 2, 4, shift_size=4)


def _bicubic(grid, size):
    """Separable cubic convolution (Keys, a = -0.75; borders replicated;
    half-pixel centres), as torch's bicubic interpolation, written out."""

    def weights(t):
        a = -0.75
        return [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]

    def resize_rows(x, n):
        m = x.shape[0]
        out = []
        for o in range(n):
            src = (o + 0.5) * m / n - 0.5
            i = math.floor(src)
            w = weights(src - i)
            out.append(
                sum(w[k] * x[min(max(i - 1 + k, 0), m - 1)] for k in range(4)))
        return torch.stack(out)

    return resize_rows(resize_rows(grid, size[0]).t(), size[1]).t()


def test_bias_table_of_another_window_is_resized_on_load():
    """A window-7 checkpoint's bias tables load into a window-12 module
    resized bicubically per head (as mmseg's Swin resizes them), instead
    of failing to load; a table of the same size loads as it is."""
    torch.manual_seed(0)
    src, dst = WindowMSA(16, 7, 2), WindowMSA(16, 12, 2)
    table = torch.randn(13 * 13, 2, dtype=torch.float64).float()
    state = dict(src.state_dict(), relative_position_bias_table=table)
    dst.load_state_dict(state)
    got = dst.relative_position_bias_table.detach()
    assert got.shape == (23 * 23, 2)
    for head in range(2):
        ref = _bicubic(table[:, head].double().view(13, 13), (23, 23))
        torch.testing.assert_close(
            got[:, head].view(23, 23).double(), ref, rtol=0, atol=1e-5)
    # The zero offset (the centre) maps onto itself.
    assert torch.equal(got[23 * 11 + 11], table[13 * 6 + 6])
    src.load_state_dict(state)
    assert torch.equal(src.relative_position_bias_table.detach(), table)
    # Another number of heads is not a window size: the load refuses.
    with pytest.raises(RuntimeError, match='size mismatch'):
        WindowMSA(16, 12, 4).load_state_dict(state)
