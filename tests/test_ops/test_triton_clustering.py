# Copyright (c) boat-mm contributors. All rights reserved.
"""The Triton clustering kernels (:mod:`boat_mm.ops.triton.clustering`)
against the tensor implementation.

Without CUDA they run on CPU tensors in Triton's interpreter (CI); with
CUDA, compiled, on CUDA tensors, plus the real-size tests at the end.
Hard clustering is discontinuous, so exact comparisons use float64 or
seeded float32 inputs whose float64 clustering they reproduce.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # triton.jit picks the interpreter when a kernel is decorated, i.e.
    # when the kernel module is first imported.
    os.environ.setdefault('TRITON_INTERPRET', '1')

triton = pytest.importorskip('triton')

from boat_mm.ops.clustering import (_clustering_tensor_ops, build_cluster_plan,
                                    cpu_kernel_available)
from boat_mm.ops.triton import clustering as tc

INTERPRETED = not isinstance(tc._subtree_kernel, triton.runtime.JITFunction)
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
if not INTERPRETED and DEVICE == 'cpu':
    pytest.skip('compiled Triton kernels need CUDA', allow_module_level=True)


def needs_cuda(test):
    """Marked ``cuda`` (see tests/conftest.py); also skipped where the
    kernels are interpreted."""
    return pytest.mark.cuda(
        pytest.mark.skipif(
            not torch.cuda.is_available() or INTERPRETED,
            reason='needs CUDA and compiled Triton kernels')(test))


def _triton(x, plan, iters=2, temperature=100.):
    return tc.balanced_clustering(x, plan.num_levels, plan.slot_size, iters,
                                  temperature)


def _check_contract(perm, plan, rows):
    """``perm`` is ``(rows, G * S)`` int64; its real slots hold every token
    once, its padding slots token ``N - 1``."""
    N = plan.num_tokens
    assert perm.dtype == torch.long
    assert perm.shape == (rows, plan.num_clusters * plan.slot_size)
    valid = plan.slot_valid.to(perm.device)
    real = perm[:, valid].sort(dim=1).values
    assert torch.equal(real,
                       torch.arange(N, device=perm.device).expand(rows, N))
    assert (perm[:, ~valid] == N - 1).all()


def _randn(rows, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, d, generator=g, dtype=dtype).to(DEVICE)


# (N, rows, d, iters, temperature). Uniform N = 49 * 2**L (L = 0..3);
# padded N on both sides of the limits of num_clusters_for (one cluster up
# to 66 = 1.35 * 49, two from 67; level rounding at 49 * 2**1.5 = 138.6;
# 1.35 * 98 = 132.3; 1.35 * 196 = 264.6), fewer tokens than a group.
FLOAT64_CASES = [(49, 2, 8, 2, 100.), (98, 2, 16, 2, 100.),
                 (196, 2, 32, 1, 100.), (392, 1, 16, 2, 100.),
                 (10, 2, 8, 2, 100.), (66, 2, 8, 2, 100.),
                 (67, 3, 16, 2, 100.), (132, 2, 64, 0, 100.),
                 (133, 2, 16, 2, 5.), (139, 2, 32, 1, 100.),
                 (265, 2, 8, 2, 100.)]


@pytest.mark.triton
@pytest.mark.parametrize('n,rows,d,iters,temperature', FLOAT64_CASES)
def test_float64_equals_tensor_ops(n, rows, d, iters, temperature):
    """Sums in another order are far below the ratio gaps in float64: the
    permutations are identical, padding slots included."""
    plan = build_cluster_plan(n, device=DEVICE)
    x = _randn(rows, n, d, seed=n)
    ours = _triton(x, plan, iters, temperature)
    _check_contract(ours, plan, rows)
    assert torch.equal(ours, _clustering_tensor_ops(x, plan, iters,
                                                    temperature))


# Module constants that route the levels through every schedule, with the
# kinds they must give: N = 265 has nodes of 272 / 136 / 68 slots at levels
# 0 / 1 / 2, N = 133 of 136 / 68. Chunks of 32 slots (9 / 5 / 3 per node),
# chunks of 64 with blocks of 16 tokens (several ranking blocks per chunk),
# the subtree kernel from level 1 or 2 under phased levels, no k-means
# step.
SCHEDULES = [
    (265, dict(MIN_CHUNK=32, TARGET_PROGRAMS=64,
               SORT_MAX=64), 2, ('phased', 'phased', 'phased')),
    (265, dict(MIN_CHUNK=64, TARGET_PROGRAMS=8, BLOCK_TOKENS=16,
               SORT_MAX=100), 1, ('phased', 'phased', 'subtree')),
    (265, dict(MIN_CHUNK=64, TARGET_PROGRAMS=8,
               SORT_MAX=200), 2, ('phased', 'subtree', 'subtree')),
    (133, dict(MIN_CHUNK=16, TARGET_PROGRAMS=64, BLOCK_TOKENS=16,
               SORT_MAX=64), 0, ('phased', 'phased')),
]


@pytest.mark.triton
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('n,consts,iters,kinds', SCHEDULES)
def test_every_schedule_equals_tensor_ops(monkeypatch, n, consts, iters, kinds,
                                          dtype):
    """Several programs per node with partial sums and ranks from sorted
    chunks at first, inner and last levels, and the subtree kernel under
    them: the same clusters as the tensor implementation."""
    for name, value in consts.items():
        monkeypatch.setattr(tc, name, value)
    plan = build_cluster_plan(n, device=DEVICE)
    plans = tc.level_plans(2, plan.num_levels, plan.slot_size,
                           torch.device(DEVICE))
    assert tuple(p.kind for p in plans) == kinds
    assert all(p.chunks > 1 for p in plans if p.kind == 'phased')
    x = _randn(2, n, 16, dtype, seed=7)
    ours = _triton(x, plan, iters)
    _check_contract(ours, plan, 2)
    assert torch.equal(ours,
                       _clustering_tensor_ops(x.double(), plan, iters, 100.))


@pytest.mark.triton
@pytest.mark.parametrize('n', [196, 265])
def test_float32_agrees(n):
    """float32 rounding could flip a near-tie; on these seeded inputs the
    float32 kernels give the float64 clustering, as do the tensor ops."""
    plan = build_cluster_plan(n, device=DEVICE)
    x = _randn(2, n, 32, seed=n + 1)
    exact = _clustering_tensor_ops(x, plan, 2, 100.)
    ours = _triton(x.float(), plan)
    _check_contract(ours, plan, 2)
    assert torch.equal(ours, exact)
    assert torch.equal(_clustering_tensor_ops(x.float(), plan, 2, 100.), exact)


@pytest.mark.triton
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_inputs_clustered_in_float32(dtype):
    """bfloat16 / float16 vectors are clustered in float32: the result of
    the float32 upcast, as in the tensor implementation."""
    plan = build_cluster_plan(139, device=DEVICE)
    x = _randn(2, 139, 16, torch.float32, seed=11).to(dtype)
    ours = _triton(x, plan)
    assert torch.equal(ours, _triton(x.float(), plan))
    assert torch.equal(ours, _clustering_tensor_ops(x, plan, 2, 100.))
    assert torch.equal(ours, _clustering_tensor_ops(x.double(), plan, 2, 100.))


@pytest.mark.triton
@pytest.mark.parametrize('dtype,programs', [(torch.float64, None),
                                            (torch.float32, None),
                                            (torch.float32, 64),
                                            (torch.float64, 64)])
def test_ties_broken_by_position(monkeypatch, dtype, programs):
    """Duplicate tokens tie at every level; the earlier position goes
    first (a stable sort), in the subtree kernel's sort and counts and in
    the ranks of phased levels (chunks of 32 slots)."""
    monkeypatch.setattr(tc, 'TARGET_PROGRAMS', programs)
    monkeypatch.setattr(tc, 'MIN_CHUNK', 32)
    monkeypatch.setattr(tc, 'SORT_MAX', 1024 if programs is None else 64)
    plan = build_cluster_plan(196, device=DEVICE)
    x = _randn(2, 98, 8, dtype, seed=3).repeat_interleave(2, dim=1)
    ours = _triton(x, plan)
    _check_contract(ours, plan, 2)
    if dtype == torch.float64:
        assert torch.equal(ours, _clustering_tensor_ops(x, plan, 2, 100.))
    # Each pair stays together, the earlier token first.
    pos = torch.empty_like(ours).scatter_(
        1, ours,
        torch.arange(196, device=ours.device).expand(2, -1).contiguous())
    assert (pos[:, 1::2] - pos[:, 0::2] == 1).all()


@pytest.mark.triton
def test_rows_are_independent():
    """Each row is clustered on its own."""
    plan = build_cluster_plan(133, device=DEVICE)
    x = _randn(3, 133, 8, seed=5)
    assert torch.equal(_triton(x[1:2], plan), _triton(x, plan)[1:2])


@pytest.mark.triton
@pytest.mark.skipif(not cpu_kernel_available(), reason='needs boat_mm._C')
@pytest.mark.parametrize('n,levels,slots', [(3, 2, 1), (5, 3, 2), (40, 2, 12)])
def test_more_clusters_than_the_plan_rule(n, levels, slots):
    """The op accepts any ``L`` and ``S`` that hold ``N`` tokens, also with
    empty nodes (``N < 2**L``) or spare slots per leaf: the same result as
    the C++ op."""
    x = _randn(2, n, 4, seed=n)
    ours = tc.balanced_clustering(x, levels, slots, 2, 100.)
    ref = torch.ops.boat_mm.balanced_clustering(x.cpu(), levels, slots, 2,
                                                100.)
    assert torch.equal(ours.cpu(), ref)


def test_bad_arguments():
    x = _randn(2, 20, 4)
    with pytest.raises(ValueError, match='expects'):
        tc.balanced_clustering(x[0], 1, 10, 2, 100.)
    with pytest.raises(ValueError, match='hold all 20 tokens'):
        tc.balanced_clustering(x, 1, 9, 2, 100.)
    with pytest.raises(ValueError, match='kmeans_iters'):
        tc.balanced_clustering(x, 1, 10, -1, 100.)


@pytest.mark.triton
def test_nan_inputs_still_give_a_permutation():
    """NaN vectors cannot be refused without a host sync; they rank
    somewhere, and the result stays a valid permutation (no gather out of
    bounds downstream)."""
    plan = build_cluster_plan(139, device=DEVICE)
    x = _randn(2, 139, 8, torch.float32, seed=13)
    x[0, 5] = float('nan')
    x[1, :70] = float('nan')
    _check_contract(_triton(x, plan), plan, 2)


@needs_cuda
def test_cuda_real_size_float64_and_no_host_sync():
    """BOAT-CSWin-T's first stage at 512x512, batch 8: 128^2 tokens, 2
    heads of 32 dims. float64 equals the tensor implementation; no call
    (float64, float32, bfloat16) synchronises with the host."""
    n = 128 * 128
    plan = build_cluster_plan(n, device='cuda')
    x = torch.randn(16, n, 32, dtype=torch.float64, device='cuda')
    kinds = {
        p.kind
        for p in tc.level_plans(16, plan.num_levels, plan.slot_size, x.device)
    }
    assert kinds == {'phased', 'subtree'}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        _triton(x.to(dtype), plan)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        ours = _triton(x, plan)
        ours32 = _triton(x.float(), plan)
        ours16 = _triton(x.bfloat16(), plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(ours, _clustering_tensor_ops(x, plan, 2, 100.))
    for perm in (ours, ours32, ours16):
        _check_contract(perm, plan, 16)


@needs_cuda
def test_cuda_graph_capture():
    """The clustering is captured in a CUDA graph and replayed on new
    inputs."""
    n = 56 * 56
    plan = build_cluster_plan(n, device='cuda')
    x = torch.randn(8, n, 32, device='cuda')
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _triton(x, plan)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _triton(x, plan)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, _triton(x, plan))
