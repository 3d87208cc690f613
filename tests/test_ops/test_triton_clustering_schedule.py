# Copyright (c) boat-mm contributors. All rights reserved.
"""The schedule of the Triton clustering as it runs on an H100 (132
multiprocessors): launches, sorts, programs per launch, compiled variants
and the sm_90 compile facts of the kernels it launches.

Launches are recorded with the kernels replaced by recorders (shapes
only, nothing executed), so full-size shapes cost nothing; what the
kernels compute under the H100 schedule is checked in Triton's
interpreter at small sizes against the tensor implementation.
"""
import os
from typing import List, NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

triton = pytest.importorskip('triton')

from _triton_compile import run_compile_script

from boat_mm.ops.clustering import _clustering_tensor_ops, build_cluster_plan
from boat_mm.ops.triton import clustering as tc

INTERPRETED = not isinstance(tc._subtree_kernel, triton.runtime.JITFunction)
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
H100 = tc.TargetInfo(cuda=True, sm_count=132)
KERNELS = ('_level_kernel', '_subtree_kernel')
# Torch ops of the wrapper that launch no kernel.
NO_KERNEL = ('empty', 'empty_strided', 'view', 'slice', 'alias', 'detach')
# BOAT-CSWin-T at 512 x 512: (side, heads), 32 dims per head.
BENCHMARK = [(128, 2), (64, 4), (32, 8)]
# 20 map sizes from 33 x 47 to 129 x 97.
SWEEP = [(33 + round(i * 96 / 19), 47 + round(i * 50 / 19)) for i in range(20)]


class Launch(NamedTuple):
    kernel: str
    grid: int
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, name: str, arg_names: List[str], log: list):
        self.name, self.arg_names, self.log = name, arg_names, log

    def __getitem__(self, grid):

        def launch(*args, **kwargs):
            self.log.append(Launch(self.name, grid[0], args, kwargs))

        return launch


class _TorchOps(TorchDispatchMode):
    """Names of the torch ops run inside."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def record(monkeypatch, rows, n, d=32, dtype=torch.bfloat16, target=H100):
    """The Triton launches and the kernel-launching torch ops of one
    clustering of ``rows`` rows of ``n`` tokens, scheduled for ``target``.
    """
    plan = build_cluster_plan(n)
    log = []
    with monkeypatch.context() as patch:
        for name in KERNELS:
            patch.setattr(tc, name,
                          _Recorder(name,
                                    getattr(tc, name).arg_names, log))
        x = torch.zeros(rows, n, d, dtype=dtype)
        with _TorchOps() as ops:
            tc.balanced_clustering(
                x, plan.num_levels, plan.slot_size, 2, 100., target=target)
    torch_kernels = [o for o in ops.names if o not in NO_KERNEL]
    return plan, log, torch_kernels


def variant(launch: Launch) -> tuple:
    """What Triton compiles a launch for: the compile-time arguments, the
    launch options and the pointer types (integer arguments are not
    specialised; see test_integer_arguments_not_specialised)."""
    ptrs = tuple(
        str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__
        for a in launch.args if not isinstance(a, int))
    return (launch.kernel, tuple(sorted(launch.kwargs.items())), ptrs)


@pytest.mark.parametrize('batch', [1, 8])
@pytest.mark.parametrize('side,heads', BENCHMARK)
def test_h100_launch_chain(monkeypatch, side, heads, batch):
    """One launch per phased level plus one for the subtree below them and
    one zero fill (when a level is phased), no torch.sort: at 128^2 tokens
    5 launches of 8 levels (25 and 4 sorts before), at 32^2 one of 4.
    Every phased launch has enough programs per phase: one per
    multiprocessor, or one per MIN_CHUNK slots when the map has fewer;
    the subtree one program per node of at most SORT_MAX slots."""
    rows, n = batch * heads, side * side
    plan, log, torch_kernels = record(monkeypatch, rows, n)
    L, S = plan.num_levels, plan.slot_size
    plans = tc.level_plans(rows, L, S, H100)
    top = [p.kind for p in plans].index('subtree')
    assert all(p.kind == 'subtree' for p in plans[top:])
    # The first level whose nodes fit one program.
    assert (S << (L - top)) <= tc.SORT_MAX < (S << (L - top + 1))
    assert not any('sort' in o for o in torch_kernels)
    assert torch_kernels == (['zeros'] if top else [])
    assert len(log) == top + 1
    assert len(log) == {128: 5, 64: 3, 32: 1}[side]
    enough = min(H100.sm_count, rows * (S << L) // tc.MIN_CHUNK)
    for lv, (launch, lp) in enumerate(zip(log[:top], plans)):
        per_phase = (rows << lv) * lp.chunks
        assert launch.kernel == '_level_kernel'
        assert launch.grid == per_phase * (int(lv == 0) + 2 + 2)
        assert per_phase >= enough
    assert log[top].kernel == '_subtree_kernel'
    assert log[top].grid == rows << top


def test_compiled_variants(monkeypatch):
    """Sizes change only run-time arguments: the 20 sizes of the sweep
    compile nothing that the benchmark shapes (batch 1 and 8) did not
    (43 variants for the benchmark shapes and a new slot size recompiled
    before; 5 with the node kernel, 6 with the subtree kernel)."""
    bench, sweep = set(), set()
    for side, heads in BENCHMARK:
        for batch in (1, 8):
            log = record(monkeypatch, batch * heads, side * side)[1]
            bench.update(map(variant, log))
    for h, w in SWEEP:
        log = record(monkeypatch, 16, h * w)[1]
        sweep.update(map(variant, log))
    assert len(bench) <= 6
    assert sweep <= bench


def test_integer_arguments_not_specialised(monkeypatch):
    """Every integer the wrapper passes is declared not to specialise
    (Triton would compile again for 1 and for multiples of 16)."""
    for n in (129 * 97, 33 * 47):
        for launch in record(monkeypatch, 16, n)[1]:
            names = getattr(tc, launch.kernel).arg_names
            ints = {
                name
                for name, a in zip(names, launch.args)
                if isinstance(a, int) and not isinstance(a, bool)
            }
            assert ints and ints <= set(tc._RUNTIME_INTS)


@pytest.mark.parametrize(
    'rows,cap,kind,chunks',
    [
        (1, 1024, 'subtree', 1),  # fits one program, however few
        (1056, 1024, 'subtree', 1),
        (1056, 1026, 'phased', 3),  # too large for one program
        (4096, 2048, 'phased', 4),
        (1, 1026, 'phased', 9),  # chunks of MIN_CHUNK
        (1056, 16384, 'phased', 32),  # chunks of CHUNK_MAX
        (16, 16384, 'phased', 64),  # 1024 programs
        (2, 16384, 'phased', 128),
    ])
def test_h100_plan_boundaries(rows, cap, kind, chunks):
    """Where the H100 plan changes with the grid and the node size."""
    lp = tc.level_plans(rows, 1, cap // 2, H100)[0]
    assert (lp.kind, lp.chunks) == (kind, chunks)
    if kind == 'phased':
        size = lp.chunk_size
        assert size & (size - 1) == 0
        assert (chunks - 1) * size < cap <= chunks * size


@pytest.mark.parametrize('slots,top', [(64, 4), (65, 5), (33, 4), (32, 3),
                                       (128, 5)])
def test_subtree_starts_where_nodes_fit(slots, top):
    """The levels from the first whose nodes hold at most SORT_MAX slots
    down to the leaves are one subtree, whatever the grid."""
    for rows in (1, 16, 4096):
        plans = tc.level_plans(rows, 8, slots, H100)
        assert [p.kind
                for p in plans] == ['phased'] * top + ['subtree'] * (8 - top)
        assert [p.chunk_size for p in plans[top:]
                ] == [slots << (8 - lv) for lv in range(top, 8)]


def test_module_target(monkeypatch):
    """``TARGET`` schedules calls that name no target (a model of the GPU
    running the public op in the interpreter)."""
    n = 64 * 64

    def grids(log):
        return [(launch.kernel, launch.grid) for launch in log]

    h100 = grids(record(monkeypatch, 8, n)[1])
    interpreter = grids(record(monkeypatch, 8, n, target=None)[1])
    monkeypatch.setattr(tc, 'TARGET', H100)
    assert grids(record(monkeypatch, 8, n, target=None)[1]) == h100
    if DEVICE == 'cpu':
        assert interpreter != h100


def test_target_info_cached(monkeypatch):
    """Device properties are read once per device, not per call."""
    calls = []
    monkeypatch.setattr(tc, '_TARGETS', {})
    monkeypatch.setattr(
        torch.cuda, 'get_device_properties',
        lambda i: calls.append(i) or type('P',
                                          (), dict(multi_processor_count=132))
        ())
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    for _ in range(3):
        assert tc.target_info(torch.device('cuda')) == H100
        assert tc.target_info(torch.device('cuda:0')) == H100
    assert calls == [0]
    assert tc.target_info(torch.device('cpu')) == tc.TargetInfo(False, 1)


# (n, rows, knobs, kinds at rows): the H100 schedule (its block sizes,
# chunks and search tiles) at batch 1 and 8 around the shapes where the
# plan changes: a subtree from level 0 (98: one level of 98 slots; 265:
# three levels, sub-nodes of more than 128 slots (float32; 64 in
# float64) by block loops, the others held in registers), phased levels
# over a subtree from level 1 or 2 (SORT_MAX lowered: 133 has nodes of
# 136 / 68 slots, 265 of 272 / 136 / 68), all phased with many small
# chunks, several ranking blocks and search rounds.
H100_CASES = [
    (98, 1, {}, ('subtree', )),
    (98, 8, {}, ('subtree', )),
    (265, 2, dict(RESIDENT_VALUES=1024), ('subtree', ) * 3),
    (133, 1, dict(SORT_MAX=100), ('phased', 'subtree')),
    (133, 8, dict(SORT_MAX=100), ('phased', 'subtree')),
    (265, 2, dict(SORT_MAX=200), ('phased', 'subtree', 'subtree')),
    (265, 1, dict(SORT_MAX=100), ('phased', 'phased', 'subtree')),
    (265, 1,
     dict(MIN_CHUNK=32, BLOCK_TOKENS=16, SEARCH_VALUES=32,
          SORT_MAX=64), ('phased', 'phased', 'phased')),
]


@pytest.mark.triton
@pytest.mark.skipif(
    not INTERPRETED,
    reason='the interpreter runs the '
    'H100 schedule on CPU tensors')
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('n,rows,knobs,kinds', H100_CASES)
def test_h100_schedule_equals_tensor_ops(monkeypatch, n, rows, knobs, kinds,
                                         dtype):
    """The kernels as scheduled for an H100 give the tensor
    implementation's clusters (float32: on these seeded inputs)."""
    for name, value in knobs.items():
        monkeypatch.setattr(tc, name, value)
    plan = build_cluster_plan(n)
    d = 8
    plans = tc.level_plans(rows, plan.num_levels, plan.slot_size, H100)
    assert tuple(p.kind for p in plans) == kinds
    g = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, d, generator=g, dtype=torch.float64)
    ours = tc.balanced_clustering(
        x.to(dtype), plan.num_levels, plan.slot_size, 2, 100., target=H100)
    assert torch.equal(ours, _clustering_tensor_ops(x, plan, 2, 100.))


# Compiles, for an H100 (sm_90) with Triton's own ptxas (no GPU needed),
# every kernel variant the wrapper launches for 128^2 tokens x 16 rows
# (bfloat16, 32 dims) and for a small float64 input, recorded as in the
# tests above. The interpreter runs the kernels' Python, so it misses
# what only the compiler rejects (it once missed a constexpr reassigned in
# the bitonic sort). Prints "name regs spills" per variant.
_COMPILE_SCRIPT = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks._ptxas import compile_with_facts
from boat_mm.ops.clustering import build_cluster_plan
from boat_mm.ops.triton import clustering as c

kernels = {k: getattr(c, k) for k in ('_level_kernel', '_subtree_kernel')}
for k in kernels.values():
    assert {p.name for p in k.params if p.do_not_specialize} == set(
        c._RUNTIME_INTS) & set(k.arg_names), k
log = []

class Rec:
    def __init__(self, name):
        self.name = name
    def __getitem__(self, grid):
        return lambda *a, **kw: log.append((self.name, a, kw))

for name in kernels:
    setattr(c, name, Rec(name))
H100 = c.TargetInfo(True, 132)
for n, rows, dtype in ((128 * 128, 16, torch.bfloat16),
                       (265, 2, torch.float64)):
    plan = build_cluster_plan(n)
    x = torch.zeros(rows, n, 32, dtype=dtype)
    c.balanced_clustering(x, plan.num_levels, plan.slot_size, 2, 100.,
                          target=H100)
TYPES = {torch.bfloat16: 'bf16', torch.float32: 'fp32',
         torch.float64: 'fp64', torch.int32: 'i32', torch.int64: 'i64'}
seen = set()
for name, args, kw in log:
    kernel = kernels[name]
    opts = {k: kw.pop(k) for k in ('num_warps', 'maxnreg') if k in kw}
    key = (name, tuple(sorted(kw.items())), tuple(
        str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__
        for a in args))
    if key in seen:
        continue
    seen.add(key)
    sig = {}
    for a_name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[a_name] = '*' + TYPES[a.dtype]
        else:
            sig[a_name] = 'fp32' if isinstance(a, float) else 'i32'
    sig.update({k: 'constexpr' for k in kw})
    _, facts = compile_with_facts(ASTSource(kernel, sig, kw),
                                  GPUTarget('cuda', 90, 32), opts)
    print(name, 'f64' if kw['F64'] else 'f32', facts['registers'],
          facts['spills'])
"""


@pytest.mark.triton
def test_kernels_compile_for_sm90(tmp_path):
    """The variants launched at 128^2 tokens (bfloat16) and in float64
    compile to H100 code without spilling; the float32-math kernels use
    at most 128 registers per thread (four programs of four warps, or two
    of eight, per multiprocessor)."""
    done = run_compile_script(_COMPILE_SCRIPT, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = [line.split() for line in done.stdout.splitlines()]
    assert {f[0] for f in facts} == set(KERNELS)
    assert len(facts) >= 4
    for name, math, regs, spills in facts:
        assert int(spills) == 0, (name, math)
        if math == 'f32':
            assert int(regs) <= 128, (name, regs)
