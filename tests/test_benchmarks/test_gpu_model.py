# Copyright (c) boat-mm contributors. All rights reserved.
"""benchmarks/gpu_model.py: its sample of kernels that hand out work by
ticket, and its floor's terms."""
import sys

import pytest
import torch
import triton
import triton.language as tl
from repo_scripts import load_script

from boat_mm.ops import build_cluster_plan


@pytest.fixture(scope='module')
def model():
    path = list(sys.path)
    try:
        module = load_script('benchmarks/gpu_model.py')
    finally:
        sys.path[:] = path  # the model adds to it
    return module


@triton.jit
def _phased_kernel(sync_ptr, x_ptr, y_ptr, per_phase, BLOCK: tl.constexpr):
    """Phase ``p`` (``per_phase`` programs, by ticket) waits for phase
    ``p - 1``, then reads ``p + 1`` blocks of ``x`` and writes their sum to
    row ``ticket`` of ``y``."""
    tk = tl.atomic_add(sync_ptr, 1)
    phase = tk // per_phase
    if phase > 0:
        while tl.atomic_add(sync_ptr + phase, 0, sem='acquire') < per_phase:
            pass
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(phase + 1):
        acc += tl.load(x_ptr + i * BLOCK + offs)
    tl.store(y_ptr + tk * BLOCK + offs, acc)
    tl.debug_barrier()
    tl.atomic_add(sync_ptr + 1 + phase, 1, sem='release')


# Its programs run in the interpreter through the model's recorder, which
# replaces the launch that tests/triton_launches.py counts.
@pytest.mark.triton
@pytest.mark.parametrize('exact', [False, True])
def test_ticketed_kernel_sample_counts_every_phase(model, monkeypatch, exact):
    """The sampled programs of a kernel that takes tickets run as the
    programs of their index would (their ticket, earlier phases done), so
    every phase is counted with its weight: the estimate equals the bytes
    of all programs, and so does running them all."""
    monkeypatch.setattr(model, 'EXACT_ATOMICS', exact)
    phases, per_phase, block = 5, 7, 64
    programs = phases * per_phase
    sync = torch.zeros(1 + phases, dtype=torch.int32)
    x = torch.randn(phases, block)
    y = torch.zeros(programs, block)
    rec = model.Recorder()
    with model.recording(rec):
        _phased_kernel[(programs, )](sync, x, y, per_phase, BLOCK=block)
    launch, = rec.launches
    # Phase p: p + 1 blocks loaded, one stored, 4 bytes a value.
    expected = sum(per_phase * (p + 2) * block * 4 for p in range(phases))
    assert launch.bytes == expected
    assert launch.sampled == (programs if exact else 20)
    # Each program ran with its own index as ticket, after earlier phases.
    ran = y.abs().sum(1) > 0
    assert int(ran.sum()) == launch.sampled
    for t in ran.nonzero().flatten().tolist():
        torch.testing.assert_close(y[t], x[:t // per_phase + 1].sum(0))


def test_floor_terms_against_the_plan(model):
    """The floor's pairs, borrowed keys and clustering passes, counted
    from the plan's attention mask and level sizes instead."""
    from boat_mm.ops.triton.clustering import SORT_MAX
    side, dims, heads, batch = 48, 64, 2, 3
    N, d = side * side, dims // heads
    plan = build_cluster_plan(N, 49, 20, 'cpu')
    launches = {
        x['stage']: x
        for x in model.floor_terms((side, dims, heads), plan, batch)
    }
    S = plan.slot_size
    mask = plan.attn_mask.expand(plan.num_pairs, 2 * S, 2 * S)
    real = plan.slot_valid.view(plan.num_pairs, 2 * S)
    allowed = mask & real[:, :, None]
    pairs = int(allowed.sum())
    # Keys of the other cluster of the pair that a cluster's queries see.
    own = torch.arange(2 * S) // S
    lent = allowed & (own[:, None] != own[None, :])
    borrowed = int(lent[:, :S].any(1).sum() + lent[:, S:].any(1).sum())
    rows = batch * heads
    fwd, bwd = launches['attention forward'], launches['attention backward']
    assert fwd['flops'] == 4 * d * pairs * rows
    assert bwd['flops'] == 10 * d * pairs * rows
    terms = dict(fwd['terms'])
    assert terms['read borrowed k, v'] == rows * borrowed * 2 * d * 2
    assert terms['read q, k, v'] == batch * N * 3 * dims * 2
    big = sum(v.shape[-1] > SORT_MAX for v in plan.level_valid)
    assert big >= 1
    q = batch * N * dims * 2
    clustering = launches['clustering']
    assert clustering['bytes'] == (1 + (model.KMEANS_ITERS + 1) * big) * q + (
        rows * S * plan.num_clusters * 8)
    a = model.ASSUMPTIONS
    bw = a['tbps'] * 1e12 * a['bytes_fraction']
    assert clustering['us'] == pytest.approx(a['launch_us'] +
                                             clustering['bytes'] / bw * 1e6)


def test_grid_sample_is_spread_like_the_grid(model):
    """64 programs of the window attention's grid at 128^2 (19 x 19
    windows, 16 sample-heads): the partial windows of the last row and
    column get their share, and every sample-head is visited; tickets of
    4 or 5 equal phases get 20 / phases samples each."""
    idx = model._sample_indices((361, 16, 1), 64)
    assert len(idx) == 64
    windows = [f % 361 for f in idx]
    edge = sum(w % 19 == 18 or w >= 18 * 19 for w in windows)
    assert abs(edge / 64 - 37 / 361) <= 1.5 / 64
    assert {f // 361 for f in idx} == set(range(16))
    for phases in (4, 5):
        tickets = model._sample_indices((phases * 1024, 1, 1), 20, True)
        per_phase = [t // 1024 for t in tickets]
        assert [per_phase.count(p)
                for p in range(phases)] == [20 // phases] * phases
