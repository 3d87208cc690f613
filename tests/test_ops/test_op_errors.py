# Copyright (c) boat-mm contributors. All rights reserved.
"""Bad input to the public FSLA ops that no other test gave: each gets an
error naming the problem (coverage of the suite: docs/test_mutations.md).
"""
import pytest
import torch

from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         clustered_attention, cpu_kernel_available,
                         num_clusters_for)
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


def _impls():
    return ['tensor'] + (['cpp'] if cpu_kernel_available() else [])


def _clustered(num_tokens: int,
               group_size: int,
               overlap: int,
               B: int = 1,
               heads: int = 2,
               d: int = 4):
    """float64 qkv of ``num_tokens`` tokens, its plan and its perm."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(
        B, num_tokens, 3 * heads * d, generator=gen, dtype=torch.float64)
    plan = build_cluster_plan(num_tokens, group_size, overlap)
    q = qkv[..., :heads * d].reshape(B, num_tokens, heads, d)
    q = q.transpose(1, 2).reshape(B * heads, num_tokens, d)
    return qkv, plan, balanced_hierarchical_clustering(q, plan)


@pytest.mark.parametrize('impl', _impls())
def test_perm_must_be_the_plans_int64_layout(impl):
    """A perm of another dtype, of another plan's slot layout (the same N,
    another group_size), or of other heads is refused alike by every
    backend, before any kernel reads it (the C++ op took a wider perm
    and left the rows of uncovered tokens unwritten)."""
    qkv, plan, perm = _clustered(77, 49, 20)
    _, other, other_perm = _clustered(77, 16, 4)
    assert other_perm.shape[1] > perm.shape[1]  # the case the op took
    bad = {
        'int32': perm.int(),
        'another plan': other_perm,
        'another batch': perm.repeat(2, 1),
    }
    for what, p in bad.items():
        with pytest.raises(
                ValueError,
                match=r'perm must be int64 of shape \(B \* num_heads, '
                r'slots\) = \(2, 78\)'):
            clustered_attention(qkv, p, plan, 2, impl=impl)
    clustered_attention(qkv, perm, plan, 2, impl=impl)  # the right one


@pytest.mark.parametrize('impl', _impls())
def test_perm_missing_a_token_is_refused_on_cpu(impl):
    """A perm of the right shape whose real slots repeat a token (so miss
    another) would leave that token's output row unwritten (C++) or
    copied from another (tensor ops)."""
    qkv, plan, perm = _clustered(77, 16, 4)
    bad = perm.clone()
    real = plan.slot_valid.nonzero().flatten()
    bad[1, real[5]] = bad[1, real[6]]
    with pytest.raises(ValueError, match='do not hold every token 0 .. 76'):
        clustered_attention(qkv, bad, plan, 2, impl=impl)


@pytest.mark.parametrize('impl', _impls())
def test_perm_given_as_a_strided_view(impl):
    """A valid perm that is not contiguous (a transposed copy) gives the
    output of the contiguous one."""
    qkv, plan, perm = _clustered(77, 16, 4, B=2)
    strided = perm.t().contiguous().t()
    assert not strided.is_contiguous()
    want = clustered_attention(qkv, perm, plan, 2, impl=impl)
    got = clustered_attention(qkv, strided, plan, 2, impl=impl)
    assert torch.equal(got, want)


def test_plan_arguments_are_ints():
    with pytest.raises(ValueError, match='group_size must be >= 1, got 0'):
        num_clusters_for(100, 0)
    with pytest.raises(
            TypeError, match='num_tokens must be an int, got 100.7'):
        build_cluster_plan(100.7)
    with pytest.raises(TypeError, match='group_size must be an int, got 16.5'):
        build_cluster_plan(100, 16.5, 4)
    assert build_cluster_plan(100.0).num_tokens == 100


@pytest.mark.skipif(not cpu_kernel_available(), reason='needs boat_mm._C')
def test_raw_op_refuses_a_wider_perm():
    """``torch.ops.boat_mm.clustered_attention`` itself (no Python
    wrapper) took a perm wider than the slot layout and left the rows of
    the tokens it did not cover unwritten."""
    qkv, plan, perm = _clustered(77, 49, 20)
    _, _, wider = _clustered(77, 16, 4)
    args = (plan.slot_valid, 2, plan.slot_size, plan.overlap, 0.5, [])
    torch.ops.boat_mm.clustered_attention(qkv, perm, *args)
    with pytest.raises(
            RuntimeError,
            match=r'perm must be int64 of shape \(B \* num_heads, slots\) '
            r'= \(2, 78\)'):
        torch.ops.boat_mm.clustered_attention(qkv, wider, *args)


@pytest.mark.parametrize('impl', _impls())
def test_forward_mode_and_func_transforms_are_refused(impl):
    """jvp, forward AD, vmap and torch.func.grad through the clustered
    paths are refused (before: jvp and forward AD gave zero tangents on
    the C++ op without a word, the others torch's unrelated errors);
    torch.autograd's Jacobian, reverse mode, runs."""
    from torch.autograd import forward_ad
    from torch.func import grad, jvp, vmap
    qkv, plan, perm = _clustered(64, 16, 4)

    def attend(x):
        return clustered_attention(x, perm, plan, 2, impl=impl)

    refused = 'supports reverse-mode autograd only'
    tangent = torch.ones_like(qkv)
    for run in (lambda: jvp(attend, (qkv, ), (tangent, )), lambda: vmap(attend)
                (qkv[None]), lambda: grad(lambda x: attend(x).sum())(qkv)):
        with pytest.raises(RuntimeError, match=refused):
            run()
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match=refused):
        attend(forward_ad.make_dual(qkv, tangent))
    jacobian = torch.autograd.functional.jacobian(attend, qkv)
    x = qkv.clone().requires_grad_()
    attend(x)[0, 5, 3].backward()
    assert torch.equal(jacobian[0, 5, 3], x.grad)
