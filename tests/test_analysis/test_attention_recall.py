# Copyright (c) boat-mm contributors. All rights reserved.
"""Attention recall (boat_mm.analysis): key sets against the modules that
define them, recall against hand computations, on small maps."""
import math

import pytest
import torch
import torch.nn as nn

from boat_mm.analysis import (attention_recall, block_recall, capture_fsla,
                              fsla_keys, global_attention, random_slots,
                              stripe_window_labels, swin_window_labels,
                              window_keys, window_labels)
from boat_mm.models import BOATCSWin, BOATSwin
from boat_mm.models.utils import (BOATShiftWindowMSA, CSWinAttention,
                                  FeatureSpaceLocalAttention)
from boat_mm.ops import (build_cluster_plan, cluster_ids_from_perm,
                         clustered_attention)
from boat_mm.visualization import capture_cluster_ids


def _key_matrix(keys: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(M, N, K)`` padded key lists to a ``(M, N, N)`` bool matrix."""
    M, N, _ = keys.shape
    out = torch.zeros(M, N, num_tokens + 1, dtype=torch.bool)
    out.scatter_(2, keys.clamp(min=-1) % (num_tokens + 1), True)
    # -1 went to the spare column N.
    return out[..., :num_tokens]


def _one_hot_fsla(num_tokens: int, heads: int, group_size: int,
                  overlap: int) -> FeatureSpaceLocalAttention:
    """FSLA whose head values are one-hot token ids (``d = N``)."""
    return FeatureSpaceLocalAttention(
        num_tokens * heads, heads, group_size=group_size,
        overlap=overlap).double()


@pytest.mark.parametrize(
    'hw, group_size, overlap',
    [
        ((15, 19), 16, 4),  # 16 clusters of 17-18 tokens: padding slots
        ((8, 16), 16, 4),  # 8 clusters of 16: a uniform plan
        ((6, 8), 49, 20),  # one cluster: global attention
    ])
def test_fsla_keys_are_the_keys_of_the_op(hw, group_size, overlap):
    """With zero logits the op averages the values of exactly the keys of
    each query; one-hot values show which."""
    torch.manual_seed(0)
    N, heads, B = hw[0] * hw[1], 2, 2
    plan = build_cluster_plan(N, group_size, overlap)
    fsla = _one_hot_fsla(N, heads, group_size, overlap)
    x = torch.randn(B, N, N * heads, dtype=torch.float64)
    perm, plan2 = fsla.cluster_perm(x, hw)
    assert plan2.num_clusters == plan.num_clusters
    keys = fsla_keys(perm, plan, B * heads)
    # q = k = 0, v = one-hot token id in every head.
    qkv = torch.zeros(B, N, 3, heads, N, dtype=torch.float64)
    qkv[:, :, 2] = torch.eye(N, dtype=torch.float64)[None, :, None]
    out = clustered_attention(
        qkv.view(B, N, -1), perm, plan, heads, impl='tensor')
    seen = out.view(B, N, heads, N).transpose(1, 2).reshape(B * heads, N, N)
    expected = _key_matrix(keys, N)
    assert torch.equal(seen > 1e-9, expected)
    counts = expected.sum(-1)
    torch.testing.assert_close(seen.sum(-1), torch.ones_like(seen[..., 0]))
    # Every query is its own key; a cluster of n tokens gives n + overlap
    # keys (or all N for a single cluster).
    assert expected.diagonal(dim1=1, dim2=2).all()
    if plan.num_clusters == 1:
        assert (counts == N).all()
    else:
        ids = cluster_ids_from_perm(perm, plan)
        sizes = torch.stack([torch.bincount(r) for r in ids])
        assert torch.equal(counts, sizes.gather(1, ids) + overlap)


def _probe_swin(hw, window_size, shift_size) -> torch.Tensor:
    """``(N, N)`` bool: which keys each query of a BOATShiftWindowMSA
    sees (zero logits and position bias, one-hot values)."""
    N = hw[0] * hw[1]
    attn = BOATShiftWindowMSA(N, 1, window_size, shift_size).double().eval()
    with torch.no_grad():
        w = attn.w_msa
        w.qkv.weight.zero_()
        w.qkv.bias.zero_()
        w.qkv.weight[2 * N:] = torch.eye(N)
        w.relative_position_bias_table.zero_()
        w.proj.weight.copy_(torch.eye(N))
        w.proj.bias.zero_()
        out = attn(torch.eye(N, dtype=torch.float64)[None], hw)[0]
    return out > 1e-9


def _probe_cswin(hw, split_size, full_map) -> torch.Tensor:
    """The same for CSWinAttention: the union over its branches."""
    N = hw[0] * hw[1]
    C = N if full_map else 2 * N
    attn = CSWinAttention(C, 1 if full_map else 2, split_size,
                          full_map).double().eval()
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.qkv.weight[2 * C:] = torch.eye(C)
        for branch in attn.branches:
            branch.get_v.weight.zero_()
            branch.get_v.bias.zero_()
        attn.proj.weight.copy_(torch.eye(C))
        attn.proj.bias.zero_()
        x = torch.eye(N, dtype=torch.float64).repeat(1, C // N)[None]
        out = attn(x, hw)[0].view(N, C // N, N)
    return (out > 1e-9).any(1)


def _in_window(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, :, None] == labels[:, None, :]).any(0)


@pytest.mark.parametrize('hw, ws, shift', [((11, 13), 4, 2), ((9, 8), 4, 0),
                                           ((5, 9), 7, 3)])
def test_swin_window_labels_match_the_module(hw, ws, shift):
    attn = BOATShiftWindowMSA(8, 1, ws, shift)
    labels = window_labels(attn, hw)
    torch.testing.assert_close(labels, swin_window_labels(hw, ws, shift))
    assert torch.equal(_in_window(labels), _probe_swin(hw, ws, shift))


@pytest.mark.parametrize('hw, split, full', [((9, 10), 4, False),
                                             ((7, 6), 2, False),
                                             ((5, 6), 7, True)])
def test_cswin_window_labels_match_the_module(hw, split, full):
    attn = CSWinAttention(8, 2, split, full)
    labels = window_labels(attn, hw)
    assert torch.equal(_in_window(labels), _probe_cswin(hw, split, full))
    with pytest.raises(
            TypeError,
            match='No image-space window .* Conv2d: '
            r'give the class a method window_labels\(hw_shape\)'):
        window_labels(nn.Conv2d(1, 1, 1), hw)


def test_another_family_gives_its_windows():
    """The attention of a family the analysis does not know gives its
    windows by its own window_labels method (here rows of the map)."""

    class RowAttention(nn.Module):

        def window_labels(self, hw_shape):
            return torch.arange(hw_shape[0]).repeat_interleave(
                hw_shape[1])[None]

    labels = window_labels(RowAttention(), (3, 4))
    assert labels.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]]


def _ranked_window(in_window: torch.Tensor, hw, query: int,
                   count: int) -> list:
    """The rule of window_keys, written with Python's sort."""
    H, W = hw
    r, c = divmod(query, W)

    def rank(j):
        rj, cj = divmod(j, W)
        return (not bool(in_window[query, j]), (rj - r)**2 + (cj - c)**2, j)

    return sorted(range(H * W), key=rank)[:count]


def test_window_keys_cut_and_complete():
    hw = (9, 10)
    labels = stripe_window_labels(hw, [(9, 2), (2, 10)])
    inside = _in_window(labels)
    counts = torch.tensor([[5, 27, 40, 90] * 22 + [1, 3]])  # (1, 90)
    keys = window_keys(labels, hw, counts)[0]
    for query in range(90):
        n = int(counts[0, query])
        got = keys[query][keys[query] >= 0].tolist()
        assert got == _ranked_window(inside, hw, query, n)
    # The cross of a 2-wide stripe pair holds 9*2 + 10*2 - 4 = 34 tokens
    # here (no padding at query 0's stripes): 27 keys are a cut, 40 go
    # beyond it.
    assert int(inside[0].sum()) == 34


def _group_input(hw, groups: torch.Tensor, amp: float) -> torch.Tensor:
    """Token vectors identical within each of 8 groups: three +-1 bits of
    weights 16, 4, 1 (far apart, so that the binary splits of the tree
    follow them) and a one-hot id."""
    g = torch.arange(8)
    bits = torch.stack([(g >> 2) & 1, (g >> 1) & 1, g & 1], 1) * 2. - 1
    vec = torch.cat([bits * torch.tensor([16., 4., 1.]), torch.eye(8)], 1)
    return amp * vec[groups].double()


@pytest.mark.parametrize('labels_fn', [
    lambda hw: swin_window_labels(hw, 4, 0),
    lambda hw: stripe_window_labels(hw, [(hw[0], 2), (2, hw[1])]),
])
def test_known_attention_cluster_and_window_recall(labels_fn):
    """Keys identical within 8 scattered groups of 16 that the clustering
    finds: each query's attention is uniform over its group, so cluster
    recall is 1 and window recall is the share of its group among its
    window keys."""
    hw, C = (8, 16), 11
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(8).repeat_interleave(16)[torch.randperm(
        128, generator=gen)]
    fsla = FeatureSpaceLocalAttention(C, 1, group_size=16, overlap=4).double()
    with torch.no_grad():  # q = k = x
        fsla.qkv.weight.zero_()
        fsla.qkv.bias.zero_()
        fsla.qkv.weight[:C] = torch.eye(C)
        fsla.qkv.weight[C:2 * C] = torch.eye(C)
    x = _group_input(hw, groups, amp=1.)[None]
    with capture_fsla({(0, 0): fsla}) as records:
        fsla(x, hw)
    record, = records[(0, 0)]
    ids = record.cluster_ids[0, 0]
    # The clustering found the groups (one cluster per group).
    assert len({(int(a), int(b)) for a, b in zip(ids, groups)}) == 8
    # |q|^2 - q.q' >= 3 for another group (lowest bit and id); scale
    # them up so that other groups get no mass.
    record = record._replace(scale=50.)
    labels = labels_fn(hw)
    res = block_recall(record, labels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(res['cluster'], torch.ones_like(res['cluster']))
    assert (res['keys'] == 20).all()  # 16 + 4 borrowed
    inside = _in_window(labels)
    expected = torch.tensor([
        sum(
            int(groups[j] == groups[i])
            for j in _ranked_window(inside, hw, i, 20)) / 16
        for i in range(128)
    ],
                            dtype=torch.float64)
    torch.testing.assert_close(res['window'][0, 0], expected)
    assert 0 < expected.mean() < 0.5  # scattered groups: windows miss


def test_random_baseline_is_chance():
    """On random inputs the random partition's recall averages keys / N;
    averaged over draws, each query's recall is
    a + (K - 1) / (N - 1) * (1 - a) with a its self-attention."""
    torch.manual_seed(0)
    N, d, M = 256, 8, 4
    plan = build_cluster_plan(N, 16, 4)  # 16 clusters of 16, 20 keys
    q = torch.randn(M, N, d, dtype=torch.float64)
    k = torch.randn(M, N, d, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([
        attention_recall(
            q, k, dict(random=fsla_keys(random_slots(plan, M, gen), plan, M)),
            d**-0.5)['random'] for _ in range(100)
    ])
    assert abs(float(draws[0].mean()) - 20 / N) < 0.005
    probs = (q @ k.transpose(1, 2) * d**-0.5).softmax(-1)
    a = probs.diagonal(dim1=1, dim2=2)
    expected = a + 19 / 255 * (1 - a)
    assert float((draws.mean(0) - expected).abs().mean()) < 0.004
    # A random partition is balanced with FSLA's cluster sizes.
    slots = random_slots(plan, M, gen)
    ids = cluster_ids_from_perm(slots, plan)
    assert all(torch.bincount(r).tolist() == [16] * 16 for r in ids)


def test_chunked_equals_direct_softmax():
    torch.manual_seed(1)
    M, N, d = 3, 7 * 9, 5
    q = torch.randn(M, N, d, dtype=torch.float64) * 2
    k = torch.randn(M, N, d, dtype=torch.float64) * 2
    keys = torch.randint(-1, N, (M, N, 11))
    shared = torch.randint(-1, N, (1, N, 4))  # broadcast over rows
    direct = (q @ k.transpose(1, 2) * 0.7).softmax(-1)
    for chunk in (None, 1, 5, N):
        got = attention_recall(q, k, dict(a=keys, b=shared), 0.7, chunk)
        for name, idx in (('a', keys), ('b', shared.expand(M, -1, -1))):
            ref = torch.zeros(M, N, dtype=torch.float64)
            for m in range(M):
                for i in range(N):
                    # Padding (-1) and repeats: each listed entry counts.
                    for j in idx[m, i].tolist():
                        if j >= 0:
                            ref[m, i] += direct[m, i, j]
            torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        global_attention(q[1], k[1], 0.7, 5), direct[1, 5])


@pytest.mark.parametrize('backbone_cls, arch', [
    (BOATCSWin, dict(
        embed_dims=8, depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 2))),
    (BOATSwin, dict(embed_dims=8, depths=(2, 2, 2, 1),
                    num_heads=(1, 2, 2, 2))),
])
def test_capture_fsla_records_what_fsla_computes(backbone_cls, arch):
    torch.manual_seed(0)
    backbone = backbone_cls(
        arch=arch, fsla_cfg=dict(group_size=16, overlap=4),
        drop_path_rate=0.).eval()
    x = torch.randn(2, 3, 58, 74)
    with torch.no_grad():
        ref = backbone(x)
        with capture_fsla(backbone) as records:
            out = backbone(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    assert all(not m._forward_pre_hooks for m in backbone.modules())
    ids = capture_cluster_ids(backbone, x)
    assert list(records) == list(ids)
    for loc, recs in records.items():
        record, = recs
        fsla = backbone.fsla_modules()[loc]
        H, W = record.hw_shape
        assert record.q.shape == (2, fsla.num_heads, H * W, fsla.head_dims)
        assert torch.equal(record.cluster_ids.view(ids[loc].shape), ids[loc])
        assert record.scale == fsla.scale
        res = block_recall(
            record,
            window_labels(backbone.stages[loc[0]].blocks[loc[1]].attn, (H, W)))
        for name in ('cluster', 'window', 'random'):
            assert res[name].shape == (2, fsla.num_heads, H * W)
            assert ((res[name] >= 0) & (res[name] <= 1 + 1e-6)).all()
        if record.plan.num_clusters == 1:  # global: every key counts
            torch.testing.assert_close(res['cluster'],
                                       torch.ones_like(res['cluster']))
    # The maps of stage 0 are 15x19 = 285 tokens.
    with pytest.raises(
            ValueError,
            match=r'15x19 map \(285 tokens\), more '
            r'than max_tokens=284'):
        with capture_fsla(backbone, max_tokens=284), torch.no_grad():
            backbone(x)
    assert all(not m._forward_pre_hooks for m in backbone.modules())
    assert math.isfinite(float(res['window'].mean()))
