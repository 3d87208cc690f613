# Copyright (c) boat-mm contributors. All rights reserved.
"""The C++ CPU clustering kernel (``torch.ops.boat_mm.balanced_clustering``)
against the tensor implementation, plus its registration and errors.

``tests/test_ops/test_fsla.py`` runs every FSLA test with both
implementations; this file checks the kernel directly.
"""
import os

import pytest
import torch

from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         cpu_kernel_available)

needs_kernel = pytest.mark.skipif(
    not cpu_kernel_available(), reason='boat_mm._C is not built')


def _both(x, plan, **kwargs):
    return (balanced_hierarchical_clustering(x, plan, impl='cpp', **kwargs),
            balanced_hierarchical_clustering(x, plan, impl='tensor', **kwargs))


@pytest.mark.skipif(
    os.environ.get('BOAT_MM_WITH_OPS', '1') == '0',
    reason='built without the C++ kernels on purpose')
def test_kernel_is_built():
    """The project's install builds boat_mm._C; CI must not silently test
    only the fallback."""
    assert cpu_kernel_available()
    assert hasattr(torch.ops.boat_mm, 'balanced_clustering')


# (H, W, rows M, dims d): uniform N = 49 * 2**L, padded N, one cluster,
# widths that are not a multiple of the vector width, d = 1.
SHAPES = [(7, 14, 3, 32), (14, 14, 4, 24), (28, 28, 2, 32), (11, 13, 3, 7),
          (23, 23, 2, 40), (5, 7, 2, 16), (1, 1, 2, 4), (9, 9, 5, 1),
          (31, 17, 2, 8)]


@needs_kernel
@pytest.mark.parametrize('h,w,rows,dims', SHAPES)
@pytest.mark.parametrize('iters,temperature', [(2, 100.), (0, 100.), (3, 5.)])
def test_kernel_equals_tensor_ops_in_float64(h, w, rows, dims, iters,
                                             temperature):
    """Same arithmetic, sums in another order: in float64 the rounding is
    far below any ratio gap, so the permutations are identical (padding
    slots included)."""
    plan = build_cluster_plan(h * w)
    torch.manual_seed(h * 100 + w)
    x = torch.randn(rows, h * w, dims, dtype=torch.float64)
    ours, ref = _both(x, plan, kmeans_iters=iters, temperature=temperature)
    assert ours.dtype == torch.long
    assert ours.shape == (rows, plan.slot_size * plan.num_clusters)
    assert torch.equal(ours, ref)


@needs_kernel
@pytest.mark.parametrize('h,w', [(14, 14), (28, 28), (15, 20), (56, 56)])
def test_kernel_float32_agrees(h, w):
    """float32 rounding can flip a near-tie, after which the rest of that
    row's tree differs. On these seeded inputs the kernel's float32 result
    equals the float64 clustering; the tensor ops (fewer-bit partial sums
    in their matmuls) flip one near-tie in one row at 56x56."""
    plan = build_cluster_plan(h * w)
    torch.manual_seed(h + w)
    x = torch.randn(4, h * w, 32)
    ours, ref = _both(x, plan)
    exact = balanced_hierarchical_clustering(x.double(), plan, impl='cpp')
    assert torch.equal(ours, exact)
    assert (ref != exact).any(dim=1).sum() <= 1


@needs_kernel
def test_kernel_breaks_ties_by_position():
    """Duplicate tokens tie at every level; the stable rule (earlier
    position first) decides, as in the tensor implementation."""
    plan = build_cluster_plan(196)
    torch.manual_seed(3)
    base = torch.randn(2, 98, 8, dtype=torch.float64)
    x = base.repeat_interleave(2, dim=1)  # tokens 2i and 2i+1 are equal
    ours, ref = _both(x, plan)
    assert torch.equal(ours, ref)
    # Each pair stays together, the earlier token first.
    pos = torch.empty_like(ours).scatter_(1, ours,
                                          torch.arange(196).expand(2, -1))
    assert torch.equal(pos[:, 1::2] - pos[:, 0::2], torch.ones(2, 98).long())


@needs_kernel
@pytest.mark.parametrize('rows', [1, 5])
def test_kernel_does_not_depend_on_thread_count(rows):
    """The kernel goes level by level until there are enough subtrees for
    the threads, then depth first: a schedule that depends on the thread
    count, while the result must not."""
    plan = build_cluster_plan(56 * 56)
    torch.manual_seed(4)
    x = torch.randn(rows, 56 * 56, 32)
    threads = torch.get_num_threads()
    perms = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            perms.append(balanced_hierarchical_clustering(x, plan, impl='cpp'))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(perms[0], p) for p in perms[1:])
    ref = balanced_hierarchical_clustering(x.double(), plan, impl='tensor')
    assert torch.equal(
        balanced_hierarchical_clustering(x.double(), plan, impl='cpp'), ref)


@needs_kernel
def test_kernel_buffers_kept_and_fresh():
    """The kernel keeps its vector buffers between calls up to 64 MiB and
    allocates larger ones afresh: calls of growing, shrinking and too large
    sizes (float64, 2 buffers x 17408 slots x 256 dims = 68 MiB) in a row
    all equal the tensor ops."""
    torch.manual_seed(6)
    for n, dims in ((300, 16), (17000, 256), (3000, 32), (300, 16)):
        plan = build_cluster_plan(n)
        assert n < 17000 or plan.slot_size * plan.num_clusters == 17408
        x = torch.randn(1, n, dims, dtype=torch.float64)
        ours, ref = _both(x, plan)
        assert torch.equal(ours, ref)


@needs_kernel
def test_kernel_ignores_other_rows():
    """Each row is clustered on its own (batch independence)."""
    plan = build_cluster_plan(15 * 20)
    torch.manual_seed(5)
    x = torch.randn(3, 300, 16)
    alone = balanced_hierarchical_clustering(x[1:2], plan, impl='cpp')
    together = balanced_hierarchical_clustering(x, plan, impl='cpp')
    assert torch.equal(alone[0], together[1])


@needs_kernel
def test_kernel_registration():
    """Schema, fake (meta) kernel and dispatch are consistent, so that
    torch.compile can trace the op."""
    plan = build_cluster_plan(11 * 13)
    x = torch.randn(2, 143, 8)
    torch.library.opcheck(
        torch.ops.boat_mm.balanced_clustering,
        (x, plan.num_levels, plan.slot_size, 2, 100.),
        test_utils=('test_schema', 'test_faketensor'))
    meta = torch.ops.boat_mm.balanced_clustering(
        x.to('meta'), plan.num_levels, plan.slot_size, 2, 100.)
    assert meta.shape == (2, plan.num_clusters * plan.slot_size)
    assert meta.dtype == torch.long


@needs_kernel
def test_kernel_under_compile():
    plan = build_cluster_plan(15 * 20)
    x = torch.randn(2, 300, 16)

    def fn(x):
        return balanced_hierarchical_clustering(x, plan, impl='cpp')

    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    assert torch.equal(compiled(x), fn(x))


def test_impl_errors():
    plan = build_cluster_plan(49)
    x = torch.randn(1, 49, 8)
    with pytest.raises(ValueError, match="'auto', 'cpp' or 'tensor'"):
        balanced_hierarchical_clustering(x, plan, impl='cuda')
    with pytest.raises(ValueError, match=r'\(M, N, d\)'):
        balanced_hierarchical_clustering(x[0], plan)
    with pytest.raises(ValueError, match='plan is for 49'):
        balanced_hierarchical_clustering(torch.randn(1, 50, 8), plan)
    with pytest.raises(ValueError, match="clustering_impl must be"):
        FeatureSpaceLocalAttention(8, 2, clustering_impl='fast')
    if cpu_kernel_available():
        with pytest.raises(ValueError, match='runs on the CPU'):
            balanced_hierarchical_clustering(x.to('meta'), plan, impl='cpp')
    else:
        with pytest.raises(RuntimeError, match='not built'):
            balanced_hierarchical_clustering(x, plan, impl='cpp')


@needs_kernel
def test_kernel_checks_its_arguments():
    op = torch.ops.boat_mm.balanced_clustering
    x = torch.randn(2, 100, 8)
    with pytest.raises(RuntimeError, match='must hold all 100 tokens'):
        op(x, 1, 49, 2, 100.)
    with pytest.raises(RuntimeError, match=r'\(M, N, d\)'):
        op(x[0], 1, 50, 2, 100.)
    with pytest.raises(RuntimeError, match='kmeans_iters'):
        op(x, 1, 50, -1, 100.)


@pytest.mark.parametrize('impl', ['auto', 'tensor'])
@pytest.mark.parametrize('hw', [(14, 14), (11, 13)])
def test_clustered_attention_with_and_without_value_image(hw, impl):
    """The functional op gives the same output and qkv gradient whether or
    not it also returns the value image (two backward code paths)."""
    from boat_mm.ops import clustered_attention
    N = hw[0] * hw[1]
    plan = build_cluster_plan(N)
    torch.manual_seed(11)
    qkv = torch.randn(2, N, 3 * 16, requires_grad=True)
    q = qkv.detach()[..., :16].reshape(2, N, 2, 8).transpose(1, 2)
    perm = balanced_hierarchical_clustering(q.reshape(4, N, 8), plan)
    grad = torch.randn(2, N, 16)
    out = clustered_attention(qkv, perm, plan, 2, impl=impl)
    g1, = torch.autograd.grad((out * grad).sum(), qkv)
    out2, image = clustered_attention(
        qkv, perm, plan, 2, hw_shape=hw, impl=impl)
    g2, = torch.autograd.grad((out2 * grad).sum() + image.sum(), qkv)
    assert torch.equal(out, out2)
    assert torch.equal(
        image,
        qkv.detach()[..., 32:].transpose(1, 2).reshape(2, 16, *hw))
    # The image adds exactly 1 to the value channels' gradient.
    torch.testing.assert_close(g2[..., :32], g1[..., :32], rtol=0, atol=0)
    torch.testing.assert_close(g2[..., 32:], g1[..., 32:] + 1)


_FALLBACK_SCRIPT = '''
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'boat_mm._C':
            if {broken}:
                raise ImportError('undefined symbol: _ZN3c10')
            raise ModuleNotFoundError(f'No module named {{name!r}}',
                                      name=name)
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import torch
    from boat_mm.ops import cpu_kernel_available
    from boat_mm.models.utils import FeatureSpaceLocalAttention
msgs = [str(w.message) for w in caught if 'boat_mm._C' in str(w.message)]
assert not cpu_kernel_available()
fsla = FeatureSpaceLocalAttention(16, 2).requires_grad_(False)
x = torch.randn(1, 196, 16)
out = fsla(x, (14, 14))
assert out.shape == (1, 196, 16)
# A torch.jit trace records the clustering as one op (its tensor ops as
# the op's default kernel) and replays it exactly.
with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter('ignore')
    traced = torch.jit.trace(lambda t: fsla(t, (14, 14)), (x, ))
    assert 'boat_mm::balanced_clustering' in str(traced.graph)
    assert torch.equal(traced(x), fsla(x, (14, 14)))
print('WARNED' if msgs else 'QUIET', msgs)
'''


@pytest.mark.parametrize('broken', [False, True])
def test_fallback_without_kernel(broken):
    """Without boat_mm._C, FSLA runs on tensor ops, and traces; a kernel
    that exists but does not load is reported, a kernel that was not built
    is not."""
    import subprocess
    import sys
    result = subprocess.run(
        [sys.executable, '-c',
         _FALLBACK_SCRIPT.format(broken=broken)],
        capture_output=True,
        text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if broken:
        assert 'WARNED' in result.stdout
        assert 'pip install --no-build-isolation -e .' in result.stdout
    else:
        assert 'QUIET' in result.stdout
