# Copyright (c) boat-mm contributors. All rights reserved.
"""The cache of cluster plans is bounded.

Every input size makes a plan per stage with FSLA, and the plans live on
the input's device: detection (keep-ratio resizing, multi-scale training,
batches padded to their largest image) meets hundreds of sizes, at up to
21 MiB each for the 1333x800 inputs, so a cache of every plan grows the
GPU memory by gigabytes over a run.
"""
from collections import OrderedDict

import torch

from boat_mm.ops import build_cluster_plan, clustering


def _nbytes(plan: clustering.ClusterPlan) -> int:
    tensors = [
        t for field in plan
        for t in (field if isinstance(field, tuple) else (field, ))
        if isinstance(t, torch.Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_most_recently_used_plans_are_kept(monkeypatch):
    monkeypatch.setattr(clustering, '_PLAN_CACHE', OrderedDict())
    size = clustering.PLAN_CACHE_SIZE
    assert 24 <= size <= 64  # mmseg's 6-scale TTA of 4 stages fits
    hot = build_cluster_plan(100, 16, 4)
    sizes = range(200, 200 + 3 * size)
    for n in sizes:
        build_cluster_plan(n, 16, 4)
        # A size in use every step is never dropped: the same object.
        assert build_cluster_plan(100, 16, 4) is hot
    cached = [key[0] for key in clustering._PLAN_CACHE]
    assert cached == list(sizes[-(size - 1):]) + [100]
    # A dropped size is built again, the same plan.
    again = build_cluster_plan(200, 16, 4)
    fresh = clustering._build_plan(200, 16, 4, torch.device('cpu'))
    assert again.num_clusters == fresh.num_clusters == 16
    assert torch.equal(again.attn_mask, fresh.attn_mask)
    assert len(clustering._PLAN_CACHE) == size


def test_plan_size_of_a_detection_input():
    """The figure of PLAN_CACHE_SIZE's comment: stage 0 (stride 4) of a
    1333x800 input padded to 1344x800 holds 21 MiB of plan, 200 to 340
    bytes a token at the maps of detection's stages 0 to 2."""
    plans = [
        clustering._build_plan(200 * 336 // 4**i, 49, 20, torch.device('cpu'))
        for i in range(3)
    ]
    assert round(_nbytes(plans[0]) / 2**20) == 21
    for i, plan in enumerate(plans):
        assert 200 < _nbytes(plan) / plan.num_tokens < 340, i


def test_repr_gives_the_numbers_not_the_masks():
    """A plan prints as the numbers that define it (its masks hold 200 to
    340 bytes a token)."""
    plan = build_cluster_plan(56 * 56, 49, 20, torch.device('cpu'))
    assert repr(plan) == (
        'ClusterPlan(num_tokens=3136, num_clusters=64, num_levels=6, '
        'slot_size=49, num_pairs=32, uniform=True, overlap=20, device=cpu)')
