# Copyright (c) boat-mm contributors. All rights reserved.
"""FSLA against a slow, readable re-implementation of the published
algorithm, plus properties for the shapes the original cannot handle."""
import math

import pytest
import torch
import torch.nn.functional as F

from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         cluster_ids_from_perm, inverse_slots)


def reference_fsla(module, x, hw, group_size=49, overlap=20, iters=2,
                   temperature=100.):
    """The published FSLA, one (sample, head) at a time, in plain loops.

    Only defined for N = group_size * 2**L (as the original).
    """
    B, N, C = x.shape
    h = module.num_heads
    d = C // h
    qkv = module.qkv(x).view(B, N, 3, h, d)
    out = torch.zeros(B, N, h, d, dtype=x.dtype)
    levels = int(round(math.log2(N // group_size)))
    for b in range(B):
        for head in range(h):
            q, k, v = (qkv[b, :, i, head] for i in range(3))
            groups = [list(range(N))]
            for _ in range(levels):
                new_groups = []
                for g in groups:
                    feats = q[g]
                    n = len(g)
                    c0 = F.normalize(feats[:n // 2].mean(0), dim=0)
                    c1 = F.normalize(feats[n // 2:].mean(0), dim=0)
                    unit = F.normalize(feats, dim=1)
                    for _ in range(iters):
                        s = torch.stack([unit @ c0, unit @ c1], 1)
                        a = torch.softmax(s * temperature, 1)
                        c0 = F.normalize((a[:, :1] * feats).sum(0), dim=0)
                        c1 = F.normalize((a[:, 1:] * feats).sum(0), dim=0)
                    r = (unit @ c0 + 1) / (unit @ c1 + 1)
                    order = sorted(range(n), key=lambda i: r[i].item())
                    ranked = [g[i] for i in order]
                    new_groups += [ranked[:n // 2], ranked[n // 2:]]
                groups = new_groups
            for j, g in enumerate(groups):
                if len(groups) == 1:
                    keys = g
                elif j % 2 == 0:
                    keys = g + groups[j + 1][:overlap]
                else:
                    keys = g + groups[j - 1][-overlap:]
                att = (q[g] @ k[keys].T) * module.scale
                out[b, g, head] = att.softmax(-1) @ v[keys]
    out = out.reshape(B, N, C)
    v_img = qkv[:, :, 2].reshape(B, N, C).transpose(1, 2).reshape(
        B, C, *hw)
    out = out + module.get_v(v_img).flatten(2).transpose(1, 2)
    return module.proj(out)


@pytest.mark.parametrize(
    'hw,dims,heads,scale,gs,ov',
    [((7, 14), 16, 2, None, 49, 20), ((14, 7), 16, 1, 1.0, 49, 20),
     ((14, 14), 32, 4, None, 49, 20), ((28, 28), 8, 2, None, 49, 20),
     ((8, 8), 12, 3, 0.5, 16, 5)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_equals_reference(hw, dims, heads, scale, gs, ov, dtype):
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(
        dims, heads, group_size=gs, overlap=ov, qk_scale=scale).to(dtype)
    x = torch.randn(2, hw[0] * hw[1], dims, dtype=dtype)
    with torch.no_grad():
        ours = m(x, hw)
        ref = reference_fsla(m, x, hw, group_size=gs, overlap=ov)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours, ref, atol=tol, rtol=0)


ODD_SHAPES = [(1, 1), (5, 7), (10, 10), (15, 20), (32, 32), (17, 31),
              (64, 64), (64, 86)]


@pytest.mark.parametrize('hw', ODD_SHAPES)
def test_layout_properties_for_any_n(hw):
    N = hw[0] * hw[1]
    gs, ov = 49, 20
    plan = build_cluster_plan(N, gs, ov)
    torch.manual_seed(1)
    x = torch.randn(3, N, 8)
    perm = balanced_hierarchical_clustering(x, plan)
    G, S = plan.num_clusters, plan.slot_size
    used = perm[:, :plan.slot_valid.numel()]
    real = used[:, plan.slot_valid]
    # Every real token is a query exactly once.
    assert torch.equal(real.sort(1).values,
                       torch.arange(N).expand(3, -1))
    ids = cluster_ids_from_perm(perm, plan)
    counts = torch.stack([torch.bincount(r, minlength=G) for r in ids])
    assert counts.max() - counts.min() <= 1
    if N > 1.35 * gs:
        assert 0.65 * gs <= counts.min() and counts.max() <= 1.35 * gs
    else:
        assert G == 1
    if G > 1:
        mask = plan.attn_mask
        mask = mask.expand(plan.num_pairs, -1, -1) if mask.dim() == 2 \
            else mask
        valid = plan.slot_valid.view(plan.num_pairs, 2 * S)
        # Padding is never a key of a real query ...
        leak = mask & valid.unsqueeze(2) & ~valid.unsqueeze(1)
        assert not leak.any()
        # ... and a padding query only sees itself.
        pad_rows = mask[~valid]
        assert (pad_rows.sum(-1) == 1).all()
        # Real queries see their cluster plus min(ov, sibling) tokens.
        sizes = valid.view(plan.num_pairs, 2, S).sum(-1)
        for p in range(plan.num_pairs):
            s0, s1 = sizes[p].tolist()
            assert mask[p, 0].sum() == s0 + min(ov, s1)
            assert mask[p, S].sum() == s1 + min(ov, s0)
        inv = inverse_slots(perm, plan)
        assert torch.equal(used.gather(1, inv), torch.arange(N).expand(3, -1))


@pytest.mark.parametrize('hw', [(5, 7), (7, 7), (8, 8)])
def test_single_cluster_is_global_attention(hw):
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2).double()
    N = hw[0] * hw[1]
    x = torch.randn(2, N, 16, dtype=torch.float64)
    assert build_cluster_plan(N).num_clusters == 1
    qkv = m.qkv(x).view(2, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
    att = (qkv[0] @ qkv[1].transpose(-1, -2) * m.scale).softmax(-1)
    out = (att @ qkv[2]).transpose(1, 2).reshape(2, N, 16)
    v = qkv[2].transpose(1, 2).reshape(2, N, 16).transpose(1, 2)
    out = out + m.get_v(v.reshape(2, 16, *hw)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m(x, hw), m.proj(out))


@pytest.mark.parametrize('hw', [(7, 7), (14, 14), (15, 20), (32, 32)])
def test_batch_independence(hw):
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2).eval()
    x = torch.randn(1, hw[0] * hw[1], 16)
    batch = torch.cat([torch.randn_like(x), x, torch.randn_like(x)])
    with torch.no_grad():
        alone = m(x, hw)
        inside = m(batch, hw)[1:2]
    assert (alone - inside).abs().max() <= 1e-5


@pytest.mark.parametrize('hw', [(14, 14), (10, 13)])
def test_gradients_reach_all_parameters(hw):
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2)
    x = torch.randn(2, hw[0] * hw[1], 16, requires_grad=True)
    m(x, hw).square().sum().backward()
    for name in ('qkv.weight', 'qkv.bias', 'proj.weight', 'get_v.weight'):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_gradient_matches_reference():
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(8, 2).double()
    x = torch.randn(2, 98, 8, dtype=torch.float64, requires_grad=True)
    g_ours = torch.autograd.grad(m(x, (7, 14)).sum(), x)[0]
    g_ref = torch.autograd.grad(reference_fsla(m, x, (7, 14)).sum(), x)[0]
    torch.testing.assert_close(g_ours, g_ref)


def test_deterministic():
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2)
    x = torch.randn(2, 15 * 20, 16, requires_grad=True)
    out1 = m(x, (15, 20))
    g1 = torch.autograd.grad(out1.sum(), x)[0]
    out2 = m(x, (15, 20))
    g2 = torch.autograd.grad(out2.sum(), x)[0]
    assert torch.equal(out1, out2) and torch.equal(g1, g2)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2)
    x = torch.randn(2, 10 * 13, 16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    out = compiled(x, (10, 13))
    g = torch.autograd.grad(out.sum(), x)[0]
    ref = m(x, (10, 13))
    g_ref = torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def test_autocast_clusters_in_float32():
    torch.manual_seed(0)
    plan = build_cluster_plan(196)
    q = torch.randn(4, 196, 8).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        perm_amp = balanced_hierarchical_clustering(q, plan)
    # Same as clustering the bf16 values in float32 outside autocast.
    assert torch.equal(perm_amp,
                       balanced_hierarchical_clustering(q.float(), plan))
    m = FeatureSpaceLocalAttention(16, 2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(torch.randn(1, 196, 16), (14, 14))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_errors():
    with pytest.raises(ValueError, match='divisible by num_heads'):
        FeatureSpaceLocalAttention(10, 3)
    with pytest.raises(ValueError, match='overlap'):
        FeatureSpaceLocalAttention(8, 2, group_size=16, overlap=16)
    m = FeatureSpaceLocalAttention(8, 2)
    with pytest.raises(ValueError, match=r'\(B, N, C\)'):
        m(torch.randn(2, 8, 7, 7), (7, 7))
    with pytest.raises(ValueError, match='H \\* W == N'):
        m(torch.randn(2, 50, 8), (7, 7))
    with pytest.raises(ValueError, match='8 channels'):
        m(torch.randn(2, 49, 6), (7, 7))
