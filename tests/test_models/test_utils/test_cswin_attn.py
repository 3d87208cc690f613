# Copyright (c) boat-mm contributors. All rights reserved.
"""CSWin stripe attention with LePE against a slow loop over stripes."""
import pytest
import torch
import torch.nn.functional as F

from boat_mm.models.utils import CSWinAttention, LePEStripeAttention


def _stripes(size: int, width: int):
    """Real index ranges of the stripes along one axis, after symmetric
    padding to a multiple of ``width`` (``pad // 2`` before)."""
    pad = -size % width
    before = pad // 2
    out = []
    for start in range(-before, size, width):
        lo, hi = max(start, 0), min(start + width, size)
        if lo < hi:
            out.append(range(lo, hi))
    return out


def _slow_branch(qkv, heads, mode, split, scale, get_v):
    """One branch, written as plain loops over stripes and heads.

    qkv: (H, W, 3, C) of one sample. Each stripe holds only real tokens;
    its LePE is the depthwise conv of its values with zeros outside it.
    """
    H, W, _, C = qkv.shape
    d = C // heads
    if mode == 'full':
        row_sets, col_sets = [range(H)], [range(W)]
    elif mode == 'vertical':
        row_sets, col_sets = [range(H)], _stripes(W, split)
    else:
        row_sets, col_sets = _stripes(H, split), [range(W)]
    out = torch.zeros(H, W, C, dtype=qkv.dtype)
    for rows in row_sets:
        for cols in col_sets:
            r, c = list(rows), list(cols)
            sub = qkv[r][:, c]  # (h, w, 3, C)
            h, w = sub.shape[:2]
            q, k, v = (sub[:, :, i].reshape(h * w, C) for i in range(3))
            lepe = F.conv2d(
                sub[:, :, 2].permute(2, 0, 1)[None],
                get_v.weight,
                get_v.bias,
                padding=1,
                groups=C)[0].permute(1, 2, 0).reshape(h * w, C)
            res = torch.zeros(h * w, C, dtype=qkv.dtype)
            for j in range(heads):
                sl = slice(j * d, (j + 1) * d)
                attn = torch.softmax(q[:, sl] @ k[:, sl].T * scale, dim=-1)
                res[:, sl] = attn @ v[:, sl]
            res = res + lepe
            rows_idx = torch.tensor(r).repeat_interleave(w)
            out[rows_idx, torch.tensor(c).repeat(h)] = res
    return out


def _slow_cswin(module: CSWinAttention, x, hw_shape):
    B, N, C = x.shape
    H, W = hw_shape
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias)
    qkv = qkv.view(B, H, W, 3, C)
    outs = []
    for b in range(B):
        parts, start = [], 0
        for branch in module.branches:
            c = branch.embed_dims
            parts.append(
                _slow_branch(qkv[b, ..., start:start + c], branch.num_heads,
                             branch.mode, branch.split_size, branch.scale,
                             branch.get_v))
            start += c
        outs.append(torch.cat(parts, -1).reshape(N, C))
    out = torch.stack(outs)
    return F.linear(out, module.proj.weight, module.proj.bias)


@pytest.mark.parametrize(
    'hw, heads, split, full_map, qk_scale',
    [
        ((7, 7), 2, 7, False, None),  # no padding
        ((5, 7), 4, 2, False, None),  # padding on both branches
        ((6, 11), 2, 4, False, 1.0),  # symmetric padding 1 + 0, 2 + 1
        ((3, 4), 2, 7, False, None),  # stripe wider than the map
        ((4, 3), 2, 1, False, 0.3),  # CSWin stage 1 width
        ((5, 6), 2, 7, True, None),  # whole map (last stage)
    ])
def test_cswin_attention_matches_slow_loops(hw, heads, split, full_map,
                                            qk_scale):
    torch.manual_seed(0)
    C = 8
    attn = CSWinAttention(
        C, heads, split_size=split, full_map=full_map,
        qk_scale=qk_scale).double().eval()
    for branch in attn.branches:  # non-trivial LePE filters
        torch.nn.init.normal_(branch.get_v.weight)
        torch.nn.init.normal_(branch.get_v.bias)
    x = torch.randn(2, hw[0] * hw[1], C, dtype=torch.double)
    out = attn(x, hw)
    expected = _slow_cswin(attn, x, hw)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_scale_defaults_to_head_dim():
    attn = CSWinAttention(16, 4, split_size=2)
    # Each branch: 8 channels, 2 heads -> head_dim 4, as in CSWin.
    assert [b.scale for b in attn.branches] == [0.5, 0.5]
    assert CSWinAttention(16, 4, full_map=True).branches[0].scale == 0.5


def test_branch_layout():
    attn = CSWinAttention(12, 2, split_size=3)
    assert [b.mode for b in attn.branches] == ['vertical', 'horizontal']
    assert [b.get_v.weight.shape
            for b in attn.branches] == [torch.Size([6, 1, 3, 3])] * 2
    full = CSWinAttention(12, 3, full_map=True)
    assert [b.mode for b in full.branches] == ['full']
    assert full.branches[0].window_shape((5, 9)) == (5, 9)
    assert attn.branches[0].window_shape((5, 9)) == (5, 3)
    assert attn.branches[1].window_shape((5, 9)) == (3, 9)


def test_gradients_reach_all_parameters():
    torch.manual_seed(0)
    attn = CSWinAttention(8, 2, split_size=2)
    x = torch.randn(1, 15, 8, requires_grad=True)
    attn(x, (3, 5)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all()


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = CSWinAttention(8, 2, split_size=2, attn_drop=0.5)
    plain = CSWinAttention(8, 2, split_size=2)
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 12, 8)
    attn.eval()
    plain.eval()
    torch.testing.assert_close(attn(x, (3, 4)), plain(x, (3, 4)))
    attn.train()
    assert not torch.allclose(attn(x, (3, 4)), plain(x, (3, 4)))


def test_errors():
    with pytest.raises(ValueError, match='must be even'):
        CSWinAttention(6, 3)
    with pytest.raises(
            ValueError,
            match=r'^CSWinAttention: embed_dims '
            r'\(10\) must be divisible by num_heads \(4\)'):
        CSWinAttention(10, 4)
    with pytest.raises(ValueError, match=r'^LePEStripeAttention: embed_dims'):
        LePEStripeAttention(10, 4, 'vertical')
    with pytest.raises(ValueError, match='mode'):
        LePEStripeAttention(8, 2, 'diagonal')
    with pytest.raises(ValueError, match='split_size'):
        LePEStripeAttention(8, 2, 'vertical', split_size=0)
    attn = CSWinAttention(8, 2)
    with pytest.raises(ValueError, match=r'H \* W == N'):
        attn(torch.randn(1, 12, 8), (3, 5))
    with pytest.raises(ValueError, match=r'\(B, N, C\), got a 2-d'):
        attn(torch.randn(12, 8), (3, 4))
    with pytest.raises(ValueError, match='CSWinAttention built for 8 chan'):
        attn(torch.randn(1, 12, 6), (3, 4))
    with pytest.raises(ValueError, match=r'the two sizes \(H, W\)'):
        attn(torch.randn(1, 12, 8), (3, 4, 1))
    with pytest.raises(ValueError, match='qkv of shape'):
        attn.branches[0](torch.randn(1, 3, 4, 3, 8))
