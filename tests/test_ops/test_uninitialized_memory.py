# Copyright (c) boat-mm contributors. All rights reserved.
"""No implementation of FSLA reads memory it has not written.

A kernel that reads a buffer from ``torch.empty`` before writing it (an
accumulator, the padding of a tile, the slots of a short cluster) often
passes on the CPU, where fresh pages are zeros, and gives garbage on a
GPU. With ``torch.use_deterministic_algorithms(True)`` torch fills every
uninitialised float tensor with NaN and every integer one with its
largest value (``torch.utils.deterministic.fill_uninitialized_memory``),
in Python and in C++ alike; MMEngine sets that mode for
``randomness=dict(deterministic=True)``. Under it, each implementation
must still equal the slow reference of ``test_fsla.py``, in the forward
and in every gradient.
"""

import pytest
import torch
from test_fsla import one_thread  # noqa: F401 (autouse fixture)
from test_fsla import check_module_against_reference

from boat_mm.ops import _backends, build_cluster_plan, cpu_kernel_available

IMPLS = ['cpp', 'tensor', 'triton']
# A published size, padded clusters (143 tokens: 35 and 36), 65-80 slots
# (the 64 + 16 row tiles of the Triton attention), a single cluster.
CASES = [((14, 14), 16, 2), ((11, 13), 16, 2), ((33, 8), 16, 2),
         ((5, 7), 16, 2)]
# Module constants of the Triton clustering that give its ticketed
# ('phased') schedule at 133 tokens, as on a GPU at large maps: several
# programs per node, partial sums in scratch, tickets and done-counters.
PHASED = dict(MIN_CHUNK=16, TARGET_PROGRAMS=64, BLOCK_TOKENS=16, SORT_MAX=64)


@pytest.fixture
def nan_filled_memory():
    """Uninitialised tensors hold NaN (floats) and the maximum (ints)."""
    mode = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(mode)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_the_fill_is_on(nan_filled_memory):
    """The premise: fresh tensors hold NaN or the largest integer (the C++
    kernels allocate through the same ``aten::empty``)."""
    assert torch.isnan(torch.empty(8)).all()
    assert (torch.empty(3, dtype=torch.long) == torch.iinfo(
        torch.long).max).all()


# The Triton attention on the two cases whose tiles are not full.
PARAMS = [(impl, *case) for impl in IMPLS for case in CASES
          if impl != 'triton' or case[0] in ((11, 13), (33, 8))]


@pytest.mark.parametrize('impl,hw,dims,heads', [
    pytest.param(*p, marks=pytest.mark.triton) if p[0] == 'triton' else p
    for p in PARAMS
] + [pytest.param('triton-phased', (7, 19), 16, 2, marks=pytest.mark.triton)])
def test_equals_reference_with_nan_filled_memory(impl, hw, dims, heads,
                                                 nan_filled_memory,
                                                 monkeypatch):
    device = 'cpu'
    if impl == 'cpp' and not cpu_kernel_available():
        pytest.skip('boat_mm._C is not built (BOAT_MM_WITH_OPS=0)')
    if impl.startswith('triton'):
        pytest.importorskip('triton')
        # Compiled on a GPU (benchmarks/gpu_check.sh), else interpreted.
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if device == 'cpu' and not _backends.triton_interpreter_enabled():
            pytest.skip('the Triton kernels need CUDA or TRITON_INTERPRET=1')
    if impl == 'triton-phased':
        from boat_mm.ops.triton import clustering as tc
        for name, value in PHASED.items():
            monkeypatch.setattr(tc, name, value)
        plan = build_cluster_plan(hw[0] * hw[1])
        plans = tc.level_plans(2 * heads, plan.num_levels, plan.slot_size,
                               torch.device(device))
        assert [p.kind for p in plans] == ['phased'] * plan.num_levels
        impl = 'triton'
    check_module_against_reference(hw, dims, heads, impl, device)
