# Copyright (c) boat-mm contributors. All rights reserved.
"""The fused C++ CPU clustered attention
(``torch.ops.boat_mm.clustered_attention`` and its backward) against the
tensor implementation (gathers + masked SDPA), plus its registration,
dispatch and errors.

``tests/test_ops/test_fsla.py`` runs every FSLA test with the kernels on
and off; this file checks the op directly.
"""
import pytest
import torch
from attention_problems import problem as _problem
from attention_problems import run as _run

from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import (balanced_hierarchical_clustering, clustered_attention,
                         cpu_kernel_available)

needs_kernel = pytest.mark.skipif(
    not cpu_kernel_available(), reason='boat_mm._C is not built')

# (H, W, C, heads, group_size, overlap): uniform N = 49 * 2**L, padded N
# (clusters of unequal size), head widths that are not a multiple of the
# vector width (5, 12, 40), one head, no overlap, overlap near group_size,
# clusters smaller than the overlap.
CASES = [(14, 14, 64, 2, 49, 20), (28, 28, 96, 3, 49, 20),
         (11, 13, 10, 2, 49, 20), (25, 40, 80, 2, 49, 20),
         (23, 23, 24, 2, 49, 0), (17, 19, 12, 1, 49, 48), (9, 9, 24, 2, 7, 6),
         (31, 17, 16, 4, 10, 9)]


@needs_kernel
@pytest.mark.parametrize('h,w,dims,heads,group,overlap', CASES)
@pytest.mark.parametrize('scale', [None, 1.0])
def test_kernel_equals_tensor_path_in_float64(h, w, dims, heads, group,
                                              overlap, scale):
    """Output, value image and every qkv gradient row (q, k, v, padding
    slots excluded) match the gathers + masked SDPA to float64 rounding."""
    qkv, perm, plan = _problem((h, w),
                               dims,
                               heads,
                               group_size=group,
                               overlap=overlap,
                               seed=h * w)
    assert plan.num_clusters > 1
    ours = _run('cpp', qkv, perm, plan, heads, (h, w), scale)
    ref = _run('tensor', qkv, perm, plan, heads, (h, w), scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize('hw,dims,heads',
                         [((56, 56), 64, 2), ((28, 28), 128, 4),
                          ((15, 20), 32, 1)])
def test_kernel_float32_agrees(hw, dims, heads):
    qkv, perm, plan = _problem(hw, dims, heads, dtype=torch.float32)
    ours = _run('cpp', qkv, perm, plan, heads, hw)
    ref = _run('tensor', qkv, perm, plan, heads, hw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_against_explicit_attention():
    """One cluster pair written out by hand: cluster 0 sees its tokens and
    the first `overlap` of cluster 1, cluster 1 the last `overlap` of
    cluster 0 and its own (independent of the tensor path's mask)."""
    qkv, perm, plan = _problem((7, 14), 8, 1, batch=1)  # 2 clusters of 49
    out = clustered_attention(qkv, perm, plan, 1, impl='cpp')[0]
    q, k, v = qkv.detach()[0].split(8, dim=-1)
    order = perm[0]
    a, b = order[:49], order[49:98]
    for queries, keys in ((a, torch.cat([a,
                                         b[:20]])), (b, torch.cat([a[-20:],
                                                                   b]))):
        logits = q[queries] @ k[keys].T * 8**-0.5
        expected = logits.softmax(-1) @ v[keys]
        torch.testing.assert_close(out[queries], expected, rtol=0, atol=1e-12)


@needs_kernel
def test_kernel_does_not_depend_on_thread_count():
    """Tasks write disjoint rows in a fixed order: bitwise the same output
    and gradient with 1, 2 and 3 threads."""
    qkv, perm, plan = _problem((23, 29), 32, 2, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run('cpp', qkv, perm, plan, 2, (23, 29)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_kernel
def test_kernel_registration():
    """Schema, fake kernels, autograd formula and dispatch agree (what
    torch.compile relies on)."""
    qkv, perm, plan = _problem((11, 13), 16, 2)
    args = (qkv, perm, plan.slot_valid, 2, plan.slot_size, plan.overlap, 0.5,
            [11, 13])
    torch.library.opcheck(torch.ops.boat_mm.clustered_attention, args)
    out, image, lse = torch.ops.boat_mm.clustered_attention(
        *[a.to('meta') if torch.is_tensor(a) else a for a in args])
    assert out.shape == (2, 143, 16) and image.shape == (2, 16, 11, 13)
    assert lse.shape == perm.shape
    # Gradient check of the autograd formula on a small problem.
    qkv, perm, plan = _problem((7, 14), 6, 2, batch=1)
    torch.autograd.gradcheck(
        lambda t: clustered_attention(
            t, perm, plan, 2, hw_shape=(7, 14), impl='cpp'), (qkv, ))


@needs_kernel
def test_kernel_under_compile():
    qkv, perm, plan = _problem((15, 20), 16, 2, dtype=torch.float32)

    def fn(t):
        out, image = clustered_attention(
            t, perm, plan, 2, hw_shape=(15, 20), impl='cpp')
        return (out.square().sum() + image.sum())

    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    g1, = torch.autograd.grad(fn(qkv), qkv)
    g2, = torch.autograd.grad(compiled(qkv), qkv)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@needs_kernel
def test_auto_dispatch():
    """'auto' takes the op only where it applies: float32/64 on the CPU,
    no attention dropout; a torch.jit trace records it as one node."""
    qkv, perm, plan = _problem((14, 14), 16, 2, dtype=torch.float32)
    calls = []
    op = torch.ops.boat_mm.clustered_attention

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    def used_op(**kwargs):
        calls.clear()
        with torch.no_grad(), Spy():
            clustered_attention(qkv, perm, plan, 2, **kwargs)
        return op in calls

    assert used_op()
    assert not used_op(impl='tensor')
    assert not used_op(dropout_p=0.1)
    calls.clear()
    with Spy():
        clustered_attention(qkv.detach().bfloat16(), perm, plan, 2)
    assert op not in calls
    traced = torch.jit.trace(lambda t: clustered_attention(t, perm, plan, 2),
                             qkv.detach())
    assert 'boat_mm::clustered_attention' in str(traced.graph)
    assert torch.equal(
        traced(qkv.detach()), clustered_attention(qkv.detach(), perm, plan, 2))


def test_impl_errors():
    qkv, perm, plan = _problem((14, 14), 16, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="'auto', 'cpp' or 'tensor'"):
        clustered_attention(qkv, perm, plan, 2, impl='fused')
    with pytest.raises(ValueError, match='attention_impl must be'):
        FeatureSpaceLocalAttention(8, 2, attention_impl='fast')
    if not cpu_kernel_available():
        with pytest.raises(RuntimeError, match='not built'):
            clustered_attention(qkv, perm, plan, 2, impl='cpp')
        return
    with pytest.raises(ValueError, match='dropout_p=0.1'):
        clustered_attention(qkv, perm, plan, 2, dropout_p=0.1, impl='cpp')
    with pytest.raises(ValueError, match='torch.bfloat16'):
        clustered_attention(qkv.bfloat16(), perm, plan, 2, impl='cpp')


@needs_kernel
def test_kernel_checks_its_arguments():
    qkv, perm, plan = _problem((14, 14), 16, 2, dtype=torch.float32)
    op = torch.ops.boat_mm.clustered_attention
    qkv = qkv.detach()
    args = [qkv, perm, plan.slot_valid, 2, plan.slot_size, 20, 1., []]

    def call(**changes):
        names = [
            'qkv', 'perm', 'slot_valid', 'num_heads', 'slot_size', 'overlap',
            'scale', 'hw_shape'
        ]
        values = dict(zip(names, args))
        values.update(changes)
        return op(*[values[n] for n in names])

    with pytest.raises(RuntimeError, match=r'\(B, N, 3 \* C\)'):
        call(qkv=qkv[0])
    with pytest.raises(RuntimeError, match='must divide the 16 channels'):
        call(num_heads=3)
    with pytest.raises(RuntimeError, match='perm must be int64'):
        call(perm=perm[:2])
    with pytest.raises(RuntimeError, match='whole sibling pairs'):
        call(slot_valid=plan.slot_valid[:-1])
    not_first = plan.slot_valid.clone()
    not_first[0] = False
    with pytest.raises(RuntimeError, match='real slots first'):
        call(slot_valid=not_first)
    with pytest.raises(RuntimeError, match='does not match N=196'):
        call(hw_shape=[13, 14])
    with pytest.raises(RuntimeError, match='float32 and float64'):
        call(qkv=qkv.half())


@needs_kernel
@pytest.mark.parametrize('token', [196, -1])
def test_tokens_outside_the_map_refused(token):
    """The kernel indexes rows by ``perm`` unchecked: a hand-made ``perm``
    (a cluster hook's) with tokens outside ``[0, N)`` read outside ``qkv``
    and, backward, wrote outside its gradient (heap corruption); it is
    refused first."""
    qkv, perm, plan = _problem((14, 14), 16, 2, dtype=torch.float32)

    def spoil(p):
        p = p.clone()
        p[1, 3] = token
        return p

    with pytest.raises(ValueError, match=r'outside \[0, 196\)'):
        clustered_attention(qkv, spoil(perm), plan, 2, impl='cpp')
    # The op itself refuses it too, forward and backward.
    args = (qkv.detach(), spoil(perm), plan.slot_valid, 2, plan.slot_size,
            plan.overlap, 0.25)
    with pytest.raises(RuntimeError, match=r'outside \[0, 196\)'):
        torch.ops.boat_mm.clustered_attention(*args, [14, 14])
    out, image, lse = torch.ops.boat_mm.clustered_attention(
        qkv.detach(), perm, *args[2:], [14, 14])
    with pytest.raises(RuntimeError, match=r'outside \[0, 196\)'):
        torch.ops.boat_mm.clustered_attention_backward(
            torch.ones_like(out), torch.zeros_like(image), *args[:3], lse,
            *args[3:])
    module = FeatureSpaceLocalAttention(16, 2, attention_impl='cpp')
    module.register_cluster_hook(lambda mod, p: spoil(p))
    # The module refuses a hook's perm that is no ordering of the tokens.
    with pytest.raises(ValueError, match='do not hold every token 0 .. 195'):
        module(torch.randn(1, 196, 16), (14, 14))


@pytest.mark.parametrize('impl', ['tensor', 'cpp'])
def test_op_arguments_checked_alike(impl):
    """Mismatched arguments fail the same way on every backend, naming the
    mismatch (the tensor ops failed in a reshape or an index, or with
    SDPA's flash-attention message for dropout_p=-0.5)."""
    if impl == 'cpp' and not cpu_kernel_available():
        pytest.skip('boat_mm._C is not built')
    qkv, perm, plan = _problem((4, 5), 8, 2, group_size=4, overlap=1)
    qkv = qkv.detach()
    assert plan.num_clusters > 1
    for kwargs, match in [
        (dict(num_heads=3), r'num_heads \(3\) must divide the 8 channels'),
        (dict(qkv=qkv[..., :10]), r'qkv must be \(B, N, 3 \* C\)'),
        (dict(hw_shape=(4, 4)), r'hw_shape \(4, 4\) does not match N=20'),
        (dict(dropout_p=-0.5), r'dropout_p must be in \[0, 1\]'),
        (dict(perm=None), 'perm is None but the plan has'),
        (dict(qkv=torch.randn(2, 30, 24)), 'plan is for 20'),
    ]:
        args = dict(qkv=qkv, perm=perm, plan=plan, num_heads=2, impl=impl)
        with pytest.raises(ValueError, match=match):
            clustered_attention(**dict(args, **kwargs))
    with pytest.raises(ValueError, match='kmeans_iters must be >= 0'):
        balanced_hierarchical_clustering(
            torch.randn(2, 20, 2), plan, kmeans_iters=-1, impl=impl)
