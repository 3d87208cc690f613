# Copyright (c) boat-mm contributors. All rights reserved.
"""Bad input to the public FSLA ops that no other test gave: each gets an
error naming the problem (coverage of the suite: docs/test_mutations.md).
"""
import pytest
import torch

from boat_mm.ops import (build_cluster_plan, clustered_attention,
                         cpu_kernel_available)
from boat_mm.ops.clustering import _default_kernel


def test_plan_refuses_no_tokens_and_a_large_overlap():
    with pytest.raises(ValueError, match='at least one token, got 0'):
        build_cluster_plan(0)
    for overlap in (-1, 16, 17):
        with pytest.raises(
                ValueError, match=f'overlap={overlap}, group_size=16; lower'):
            build_cluster_plan(64, 16, overlap)


def test_default_clustering_kernel_refuses_a_slot_size_of_another_plan():
    """``boat_mm::balanced_clustering``'s tensor-op kernel (where no
    device kernel is built, and for tracers) takes the op's own levels
    and slots, which must be a plan's."""
    x = torch.randn(2, 98, 8, dtype=torch.float64)
    plan = build_cluster_plan(98)
    perm = _default_kernel(x, plan.num_levels, plan.slot_size, 2, 100.)
    assert perm.shape == (2, plan.num_clusters * plan.slot_size)
    with pytest.raises(
            ValueError,
            match='slot_size=50 does not fit 98 tokens in 2 '
            r'clusters \(that needs 49\)'):
        _default_kernel(x, plan.num_levels, 50, 2, 100.)


@pytest.mark.skipif(not cpu_kernel_available(), reason='needs boat_mm._C')
def test_perm_of_another_dtype_is_named_by_the_op():
    """The range check of a CPU perm leaves a perm that is not int64 to
    the op, whose error names the dtype."""
    plan = build_cluster_plan(98)
    qkv = torch.randn(1, 98, 24)
    perm = torch.zeros(2, plan.slot_valid.numel(), dtype=torch.int32)
    with pytest.raises(RuntimeError, match='int64|Long'):
        clustered_attention(qkv, perm, plan, 2, impl='cpp')
