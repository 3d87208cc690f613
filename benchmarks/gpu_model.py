# Copyright (c) boat-mm contributors. All rights reserved.
"""A model of FSLA's forward+backward time on an H100, from the kernels.

No GPU has been lent to this project, so this script predicts instead of
measuring. For each benchmark shape (batch 8, bfloat16) it

1. records, in Triton's interpreter, every kernel launch and every torch
   op of one FSLA forward+backward (the Triton clustering, the clustered
   attention forward and backward) and of a FlashAttention-style 7x7
   window attention of the same shape written the same way
   (``benchmarks/_window_attention.py``), as the wrappers would launch
   them on a CUDA device of 132 SMs: their plan functions (those with a
   ``device`` parameter) are called with a CUDA device and
   ``torch.cuda.get_device_properties`` answers an H100's figures;
2. runs a few programs of every launch in the interpreter and counts what
   they execute: ``tl.dot`` FLOPs, and the bytes every load and store
   moves (the larger of the useful bytes and 32 bytes per distinct
   32-byte sector an access touches, so uncoalesced accesses cost what
   the memory system moves); the other programs are not run. A kernel
   that hands out work by ticket (an atomic counter) has its sampled
   programs replayed as the programs of their index: that ticket, with
   the programs of smaller tickets counted done;
3. compiles every distinct kernel variant (constexprs, warps, Triton's
   integer and alignment specialisation) for sm_90 with Triton's bundled
   ptxas in a subprocess and reads registers, spills and shared memory;
4. predicts the time of every launch from a stated roofline (see
   ``ASSUMPTIONS`` and docs/benchmarks.md) and adds them up: every launch
   depends on the one before.

It prints one table and, with ``--json FILE``, writes one record per
shape. ``--floor`` also computes the least any design of FSLA's structure
can cost under the same roofline (``FLOOR_PREMISES``) and prints it
beside the prediction, with its terms; ``--sweep`` also counts the
compiled variants over 20 token-map sizes; ``--check`` runs the
window-attention kernels against plain attention in float64 first;
``--shape`` and ``--batch`` model other shapes (small ones make
``--exact-atomics``, which runs every program of ticketed kernels,
affordable).

Example::

    python benchmarks/gpu_model.py --floor
    python benchmarks/gpu_model.py --json work_dirs/gpu_model.json --sweep
    python benchmarks/gpu_model.py --shape 32 256 8 --batch 1 --exact-atomics
"""
import os
import sys

if '--compile-worker' not in sys.argv:
    # Before the first import of triton: the kernels become interpreted.
    os.environ['TRITON_INTERPRET'] = '1'

import argparse
import contextlib
import importlib
import inspect
import json
import math
import os.path as osp
import re
import subprocess
import tempfile
import types
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

# (side, C, heads): the BOAT-CSWin-T stages of a 512x512 crop.
SHAPES = [(128, 64, 2), (64, 128, 4), (32, 256, 8)]
BATCH = 8
# FSLA's k-means iterations per split and temperature (BOAT's defaults).
KMEANS_ITERS = 2
TEMPERATURE = 100.

# The H100 SXM and the roofline. Every figure the prediction uses.
ASSUMPTIONS = dict(
    sms=132,
    tflops_bf16=990.,  # dense bf16 tensor-core peak
    flops_fraction=0.5,  # of it, reached by tl.dot in these kernels
    tbps=3.35,  # HBM bandwidth
    bytes_fraction=0.7,  # of it, reached by the kernels' loads and stores
    sm_bandwidth_boost=4.,  # an SM alone pulls at most 4x its 1/132 share
    launch_us=4.,  # per dependent launch (issue, ramp-up, drain)
    regs_per_sm=65536,
    smem_per_sm=233472,
    smem_reserved_per_block=1024,
    max_warps_per_sm=64,
    max_blocks_per_sm=32,
    # Programs run in the interpreter per launch (strata of the first grid
    # axis: 64 put 3-4 in the partial windows of the last row and column).
    sampled_programs=64,
    # ... per launch of a kernel that takes tickets: the middles of 20
    # equal strata of the tickets (20 = lcm(4, 5): the clustering's phased
    # levels have 4 or 5 phases of equal length at 2 k-means iterations,
    # and every phase gets the same number of samples).
    sampled_tickets=20,
)
# torch.sort as CUB's radix sort: 8-bit digits, one pass per digit plus a
# histogram and a setup kernel, each moving keys and int64 indices in and
# out once.
SORT_DIGIT_BITS = 8
SORT_EXTRA_KERNELS = 2

_H100 = types.SimpleNamespace(
    name='NVIDIA H100 80GB HBM3 (modelled)',
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=80 * 2**30,
    regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048,
    shared_memory_per_multiprocessor=233472,
    shared_memory_per_block_optin=232448,
    L2_cache_size=50 * 2**20,
    warp_size=32)

_CUDA = torch.device('cuda', 0)
# Run every program of kernels with atomics (--exact-atomics).
EXACT_ATOMICS = False
WARNINGS = set()
# Ops that launch no kernel.
_NO_KERNEL = re.compile(r'^(empty|new_empty|empty_like|empty_strided|'
                        r'_local_scalar_dense|lift_fresh|detach|alias|'
                        r'set_)')


# ---------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------
class _Counter:
    """What the sampled programs of one launch execute."""

    def __init__(self):
        self.flops = 0
        self.bytes = 0


_ACTIVE: Optional[_Counter] = None


def _elem_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _memory_bytes(ptrs, mask) -> int:
    addr = np.asarray(ptrs.data).reshape(-1)
    on = np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data))
    addr = addr[on.reshape(-1)]
    if addr.size == 0:
        return 0
    useful = addr.size * _elem_bytes(ptrs)
    return max(useful, 32 * np.unique(addr // 32).size)


class _TicketReplay:
    """Runs a sampled program of a launch that hands out work by ticket as
    the program of that index would run in a full launch: after all
    programs with smaller tickets.

    Such a kernel's programs take a ticket (their first atomic operation, a
    scalar add of 1 to a counter) and then wait (spinning on scalar atomic
    adds of 0, which read a counter) until the programs of smaller tickets
    have counted themselves done. Here the ticket counter is set to the
    program's index before its add, and a poll that repeats at the same
    address (a program spinning) first counts one more program done at
    that address, as programs with smaller tickets would have. Nothing of
    the kernel's buffer layout is assumed.
    """

    MAX_SPIN = 1 << 20

    def __init__(self):
        self.ticket = 0
        self.first = True
        self.poll: Optional[int] = None  # address of the last atomic poll
        self.spins = 0
        self.took_tickets = True  # every sampled program's first atomic

    def start(self, ticket: int) -> None:
        self.ticket, self.first, self.poll, self.spins = ticket, True, None, 0

    def rmw(self, builder, rmw, op, ptr, val, mask, sem, scope):
        from triton._C.libtriton import ir
        from triton.runtime.interpreter import _interpreter
        addr = np.asarray(ptr.data).reshape(-1)
        on = np.asarray(mask.data).reshape(-1)
        v = np.asarray(val.data).reshape(-1)
        scalar_add = (
            op == ir.ATOMIC_OP.ADD and addr.size == 1 and bool(on.all()))
        first, self.first = self.first, False
        poll, self.poll = self.poll, None

        def write(kind, amount: int) -> None:
            _interpreter.atomic_rmw(kind, ptr.data,
                                    np.full_like(val.data, amount), mask.data,
                                    builder.ir_sem_to_interpreter_sem[sem])

        if first:
            if scalar_add and v[0] == 1:
                # The counter as the programs before this one left it.
                write(_interpreter.RMW_OP.XCHG, self.ticket)
            else:
                self.took_tickets = False
        elif scalar_add and v[0] == 0:
            if poll == int(addr[0]):
                self.spins += 1
                if self.spins > self.MAX_SPIN:
                    raise RuntimeError(
                        'a sampled program spins on a counter that programs '
                        'with smaller tickets never complete')
                write(_interpreter.RMW_OP.ADD, 1)
            self.poll = int(addr[0])
        return rmw(builder, op, ptr, val, mask, sem, scope)


_REPLAY: Optional[_TicketReplay] = None


def _install_counters() -> None:
    """Wraps the interpreter's dot, load and store to count (only while a
    launch's sampled programs run), and its atomics to replay tickets."""
    from triton.runtime import interpreter as itp
    cls = type(itp.interpreter_builder)
    # (Another import of this file may have wrapped them: its wrappers
    # would count into its own globals.)
    if getattr(cls, '_gpu_model_owner', None) is _install_counters:
        return
    if not hasattr(cls, '_gpu_model_originals'):
        cls._gpu_model_originals = (cls.create_dot, cls.create_masked_load,
                                    cls.create_masked_store,
                                    cls.create_atomic_rmw)
    dot, load, store, rmw = cls._gpu_model_originals

    def create_dot(self, a, b, d, *args):
        if _ACTIVE is not None:
            sa, sb = np.shape(a.data), np.shape(b.data)
            batch = int(np.prod(sa[:-2])) if len(sa) > 2 else 1
            _ACTIVE.flops += 2 * batch * sa[-2] * sa[-1] * sb[-1]
        return dot(self, a, b, d, *args)

    def create_masked_load(self, ptrs, mask, *args):
        if _ACTIVE is not None:
            _ACTIVE.bytes += _memory_bytes(ptrs, mask)
        return load(self, ptrs, mask, *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        if _ACTIVE is not None:
            _ACTIVE.bytes += _memory_bytes(ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    def create_atomic_rmw(self, op, ptr, val, mask, sem, scope):
        if _REPLAY is not None:
            return _REPLAY.rmw(self, rmw, op, ptr, val, mask, sem, scope)
        return rmw(self, op, ptr, val, mask, sem, scope)

    cls.create_dot = create_dot
    cls.create_masked_load = create_masked_load
    cls.create_masked_store = create_masked_store
    cls.create_atomic_rmw = create_atomic_rmw
    cls._gpu_model_owner = _install_counters


def _sample_indices(grid: Tuple[int, int, int],
                    k: int,
                    tickets: bool = False) -> List[int]:
    """At most ``k`` flat program indices spread over the grid.

    Tickets: the middles of ``k`` equal strata of the flat range. Grid
    indices: the middles of ``k`` equal strata of the first axis (where
    the kernels here put the windows, cluster pairs and nodes, whose
    sizes differ at the edges), each with the middle of a stratum of the
    other axes (batch and heads here) in turn.
    """
    g0, rest = grid[0], grid[1] * grid[2]
    total = g0 * rest
    if k >= total:
        return list(range(total))
    if tickets:
        return sorted({int((i + 0.5) * total / k) for i in range(k)})
    k = min(k, g0)
    return sorted({
        int((i + 0.5) * g0 / k) + g0 * int((i + 0.5) * rest / k)
        for i in range(k)
    })


def _run_sampled(ifn,
                 grid,
                 args,
                 kwargs,
                 indices: List[int],
                 replay: Optional[_TicketReplay] = None) -> _Counter:
    """Runs the programs ``indices`` (flat) of a launch in the interpreter
    (the grid executor's own steps, over a subset of the grid); with
    ``replay``, each as the program of that index in ticket order."""
    global _ACTIVE, _REPLAY
    from triton.runtime import interpreter as itp
    fn = ifn.rewrite()
    executor = itp.GridExecutor(fn, ifn.arg_names, grid)
    args_hst, kwargs_hst = executor._init_args_hst(args, kwargs)
    scope = itp._patch_lang(fn)
    counter = _Counter()
    try:
        call = inspect.getcallargs(fn, *args_hst, **kwargs_hst)
        call = {
            n: a if n in executor.constexprs else itp._implicit_cvt(a)
            for n, a in call.items()
        }
        itp.interpreter_builder.set_grid_dim(*grid)
        _ACTIVE, _REPLAY = counter, replay
        for f in indices:
            z, rest = divmod(f, grid[0] * grid[1])
            y, x = divmod(rest, grid[0])
            itp.interpreter_builder.set_grid_idx(x, y, z)
            if replay is not None:
                replay.start(f)
            fn(**call)
    finally:
        _ACTIVE = _REPLAY = None
        scope.restore()
    return counter


def _uses_atomics(fn) -> bool:
    """Whether a kernel's own code calls atomic operations (from its code
    object: the interpreter's rewrite of another kernel of the module
    can leave ``inspect.getsource`` reading the wrong lines)."""
    code = getattr(fn, '__code__', None)
    return code is not None and any(
        n.startswith('atomic_') for n in code.co_names)


def _type_of(value, fixed: bool = False) -> Tuple[str, str]:
    """(signature type, specialisation) of a kernel argument as Triton's
    launcher on CUDA sees it: integers equal to 1 become constants,
    multiples of 16 and 16-byte aligned pointers get the divisibility
    attribute (CUDA allocations are 256-byte aligned, so a tensor's
    alignment is that of its storage offset), except for arguments in
    the kernel's ``do_not_specialize`` (``fixed``)."""
    if isinstance(value, torch.Tensor):
        names = {
            torch.float32: 'fp32',
            torch.float64: 'fp64',
            torch.bfloat16: 'bf16',
            torch.float16: 'fp16',
            torch.int64: 'i64',
            torch.int32: 'i32',
            torch.uint8: 'u8',
            torch.bool: 'i1',
            torch.int16: 'i16',
            torch.int8: 'i8'
        }
        off = value.storage_offset() * value.element_size()
        return '*' + names[value.dtype], 'D' if off % 16 == 0 else ''
    if isinstance(value, bool):
        return 'i1', ''
    if isinstance(value, int):
        if value == 1 and not fixed:
            return 'constexpr', ''
        ty = 'i32' if -2**31 <= value < 2**31 else 'i64'
        return ty, 'D' if value % 16 == 0 and not fixed else ''
    if isinstance(value, float):
        return 'fp32', ''
    if value is None:
        return 'constexpr', ''
    raise TypeError(f'cannot type kernel argument {value!r}')


def _const_repr(value):
    """A constexpr as JSON (Triton dtypes by name)."""
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return {'tl_dtype': value.name}
    if isinstance(value, tl.constexpr):
        value = value.value
    return value


class Launch:
    """One recorded kernel launch."""

    def __init__(self, kernel: str, module: str, grid: tuple,
                 signature: Dict[str, str], constexprs: dict, attrs: List[str],
                 options: dict):
        self.kernel, self.module = kernel, module
        self.grid = grid
        self.programs = grid[0] * grid[1] * grid[2]
        self.signature, self.constexprs = signature, constexprs
        self.attrs, self.options = attrs, options
        self.flops = self.bytes = 0.  # totals, estimated from the sample
        self.sampled = 0  # programs run in the interpreter

    def variant(self) -> str:
        # The signature in argument order (the compiler reads it so).
        return json.dumps([
            self.module, self.kernel,
            list(self.signature.items()),
            sorted(self.constexprs.items()), self.attrs,
            sorted(self.options.items())
        ])


class TorchOp:
    """One recorded torch op that launches device kernels."""

    def __init__(self, name: str, kernels: int, nbytes: float, sort: bool):
        self.name, self.kernels, self.bytes, self.sort = (name, kernels,
                                                          nbytes, sort)


class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the torch ops (inside the custom ops too) and, through the
    patched interpreter, the Triton launches; fresh allocations are zeroed
    so that kernels that do not run leave valid indices behind. Also lists
    where a value is read back to the host through the dispatcher
    (``int(t)``, ``bool(t)``, ``t.item()``; not ``tolist``, ``cpu`` or
    ``numpy`` of CPU tensors, which bypass it: boat_mm's ops use none)."""

    def __init__(self, sample: bool = True):
        super().__init__()
        self.launches: List[Launch] = []
        self.ops: List[TorchOp] = []
        self.sample = sample
        # Values read back to the host (int(t), bool(t), t.item()): on a
        # GPU each is a sync, where the host waits for the queue to drain.
        self.syncs: List[str] = []

    # Triton ------------------------------------------------------------
    def launch(self, ifn, args, grid, kwargs) -> None:
        from triton.runtime.jit import _normalize_ty
        names = ifn.arg_names
        annotations = {
            n: _normalize_ty(t)
            for n, t in inspect.get_annotations(ifn.fn).items()
        }
        kernel_kwargs = {k: v for k, v in kwargs.items() if k in names}
        options = {
            k: v
            for k, v in kwargs.items()
            if k not in names and k in ('num_warps', 'num_stages', 'num_ctas',
                                        'maxnreg')
        }
        options.setdefault('num_warps', 4)
        options.setdefault('num_stages', 3)
        bound = inspect.signature(ifn.fn).bind(*args, **kernel_kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        if callable(grid):
            grid = grid(call)
        grid = tuple(int(g) for g in grid) + (1, ) * (3 - len(grid))
        fixed = [
            names[n] if isinstance(n, int) else n
            for n in ifn.kwargs.get('do_not_specialize') or ()
        ]
        signature, constexprs, attrs = {}, {}, []
        for n in names:
            value = call[n]
            if annotations.get(n) == 'constexpr':
                signature[n] = 'constexpr'
                constexprs[n] = _const_repr(value)
                continue
            ty, spec = _type_of(value, n in fixed)
            signature[n] = ty
            if ty == 'constexpr':
                constexprs[n] = value
            elif spec:
                attrs.append(n)
        launch = Launch(ifn.fn.__name__, ifn.fn.__module__, grid, signature,
                        constexprs, attrs, options)
        if self.sample and launch.programs:
            k, replay = ASSUMPTIONS['sampled_programs'], None
            strata = False
            if _uses_atomics(ifn.fn):
                if EXACT_ATOMICS:
                    k = launch.programs
                else:
                    # Programs that take tickets get their work from the
                    # ticket, not the grid index: the sample replays
                    # tickets spread over the launch.
                    k, strata = ASSUMPTIONS['sampled_tickets'], True
                    replay = _TicketReplay()
            idx = _sample_indices(grid, k, tickets=strata)
            count = _run_sampled(ifn, grid, args, kernel_kwargs, idx, replay)
            if replay is not None and not replay.took_tickets:
                WARNINGS.add(f'{launch.kernel} has atomics but takes no '
                             f'ticket: its sample is by grid index')
            elif EXACT_ATOMICS and k == launch.programs:
                WARNINGS.add(f'{launch.kernel} uses atomics: all its '
                             f'programs ran')
            launch.flops = count.flops * launch.programs / len(idx)
            launch.bytes = count.bytes * launch.programs / len(idx)
            launch.sampled = len(idx)
        self.launches.append(launch)

    # torch -------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        namespace = func.namespace
        if namespace.startswith('boat_mm'):
            impl = _python_kernel(name)
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if name == '_local_scalar_dense':
            self.syncs.append(_caller())
        if _NO_KERNEL.match(name):
            if name.startswith(('empty', 'new_empty')):
                out.zero_()
            return out
        if _is_view(func):
            return out
        tensors = [
            t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
            if isinstance(t, torch.Tensor)
        ]
        nbytes = float(sum(t.numel() * t.element_size() for t in tensors))
        if name == 'sort':
            keys = args[0]
            passes = -(-keys.element_size() * 8 // SORT_DIGIT_BITS)
            kernels = passes + SORT_EXTRA_KERNELS
            moved = keys.numel() * (keys.element_size() + 8) * 2
            self.ops.append(TorchOp(name, kernels, moved * kernels, True))
        else:
            self.ops.append(TorchOp(name, 1, nbytes, False))
        return out


def _caller() -> str:
    """Where boat_mm code asked for the value being read back."""
    import traceback
    for frame in reversed(traceback.extract_stack()):
        if f'{osp.sep}boat_mm{osp.sep}' in frame.filename:
            return f'{osp.basename(frame.filename)}:{frame.lineno} ' \
                   f'({frame.name})'
    return 'outside boat_mm'


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _python_kernel(name: str):
    """The Python (Triton) kernel behind op ``boat_mm_triton::name``, so
    that its torch ops are recorded too."""
    from boat_mm.ops import _library
    table = getattr(_library, '_TRITON_KERNELS', {})
    if name not in table:
        return None
    module, fn = table[name]
    return getattr(importlib.import_module(module), fn)


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Launches go to ``recorder`` instead of running; the Triton wrappers
    plan for an H100."""
    from triton.runtime import interpreter as itp
    _install_counters()
    run = itp.InterpretedFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            recorder.launch(self, args, grid, kwargs)

    patches = _cuda_planning()
    itp.InterpretedFunction.run = fake_run
    try:
        with recorder:
            yield recorder
    finally:
        itp.InterpretedFunction.run = run
        for obj, attr, value in patches:
            setattr(obj, attr, value)


def _triton_modules() -> List[types.ModuleType]:
    import pkgutil

    import boat_mm.ops.triton as package
    mods = []
    for info in pkgutil.iter_modules(package.__path__):
        mods.append(importlib.import_module(f'{package.__name__}.{info.name}'))
    return mods


def _cuda_planning() -> List[tuple]:
    """Makes the wrappers choose as for an H100: every module-level
    function of the Triton modules with a ``device`` (or ``props``)
    parameter, other than the public entry points, is called with a CUDA
    device (or the H100's properties), and the attention's check of the
    perm's values, which CUDA tensors skip, is skipped. Returns what to
    restore."""
    patches = [(torch.cuda, 'get_device_properties',
                torch.cuda.get_device_properties)]
    torch.cuda.get_device_properties = lambda *a, **k: _H100
    # The perm check reads the perm back (a sync), for CPU tensors only.
    from boat_mm.ops import clustered_attn
    patches.append((clustered_attn, '_check_perm_values',
                    clustered_attn._check_perm_values))
    clustered_attn._check_perm_values = lambda perm, plan: None
    for mod in _triton_modules():
        public = set(getattr(mod, '__all__', ()))
        for name, fn in list(vars(mod).items()):
            if (not inspect.isfunction(fn) or fn.__module__ != mod.__name__
                    or name in public):
                continue
            params = inspect.signature(fn).parameters
            if 'device' not in params and 'props' not in params:
                continue
            patches.append((mod, name, fn))
            setattr(mod, name, _as_cuda(fn))
    return patches


def _as_cuda(fn):
    sig = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        if 'device' in bound.arguments:
            bound.arguments['device'] = _CUDA
        if 'props' in bound.arguments:
            bound.arguments['props'] = _H100
        return fn(*bound.args, **bound.kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def _random_perm(plan, rows: int, seed: int = 0) -> torch.Tensor:
    """A clustering-shaped perm (real tokens first in every cluster) of
    random tokens: the attention's addresses as a real one spreads them."""
    gen = torch.Generator().manual_seed(seed)
    N = plan.num_tokens
    valid = plan.slot_valid
    perm = torch.full((rows, valid.numel()), N - 1, dtype=torch.long)
    for r in range(rows):
        perm[r, valid] = torch.randperm(N, generator=gen)
    return perm


def record_shape(side: int,
                 dims: int,
                 heads: int,
                 batch: int = BATCH,
                 sample: bool = True) -> Dict[str, Any]:
    """The launches and ops of one FSLA forward+backward (clustering and
    clustered attention) and of one window attention forward+backward."""
    from _window_attention import (window_attention_backward,
                                   window_attention_forward)

    from boat_mm.ops import (balanced_hierarchical_clustering,
                             build_cluster_plan, clustered_attention)
    H = W = side
    N = H * W
    d = dims // heads
    plan = build_cluster_plan(N, 49, 20, 'cpu')
    gen = torch.Generator().manual_seed(side)
    qkv = torch.randn(batch, N, 3 * dims, generator=gen).bfloat16()
    q = qkv[..., :dims].reshape(batch, N, heads, d).transpose(1, 2)
    q = q.reshape(batch * heads, N, d)
    perm = _random_perm(plan, batch * heads)
    g_out = torch.randn(batch, N, dims, generator=gen).bfloat16()
    g_img = torch.randn(batch, dims, H, W, generator=gen).bfloat16()

    fsla = Recorder(sample)
    with recording(fsla):
        balanced_hierarchical_clustering(
            q, plan, KMEANS_ITERS, TEMPERATURE, impl='triton')
    x = qkv.clone().requires_grad_()
    with recording(fsla):
        out, image = clustered_attention(
            x, perm, plan, heads, hw_shape=(H, W), impl='triton')
        torch.autograd.backward((out, image), (g_out, g_img))
    window = Recorder(sample)
    with recording(window):
        o, lse = window_attention_forward(qkv, (H, W), heads)
        window_attention_backward(g_out, qkv, o, lse, (H, W), heads)
    return dict(fsla=fsla, window=window, plan=plan)


# ---------------------------------------------------------------------------
# Compiling for sm_90
# ---------------------------------------------------------------------------
def compile_variants(variants: List[str], cache_dir: str) -> Dict[str, dict]:
    """Registers, spills and shared memory of every variant, compiled for
    sm_90 in a fresh process (no interpreter)."""
    if not variants:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = osp.join(tmp, 'in.json'), osp.join(tmp, 'out.json')
        with open(src, 'w') as f:
            json.dump(variants, f)
        env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
        env.pop('TRITON_INTERPRET', None)
        root = osp.dirname(osp.dirname(osp.abspath(__file__)))
        env['PYTHONPATH'] = os.pathsep.join(
            [root, osp.dirname(osp.abspath(__file__))] +
            [p for p in [env.get('PYTHONPATH')] if p])
        done = subprocess.run([
            sys.executable,
            osp.abspath(__file__), '--compile-worker', src, dst
        ],
                              env=env,
                              capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError('compiling for sm_90 failed:\n' +
                               done.stderr[-4000:])
        with open(dst) as f:
            return dict(zip(variants, json.load(f)))


def _compile_worker(src: str, dst: str) -> None:
    import triton
    import triton.language as tl
    from _ptxas import ptxas_facts
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    with open(src) as f:
        variants = json.load(f)
    results = []
    for text in variants:
        module, kernel, signature, constexprs, attrs, options = (
            json.loads(text))
        signature, options = dict(signature), dict(options)
        constexprs = dict(constexprs)
        fn = getattr(importlib.import_module(module), kernel)
        while not isinstance(fn, triton.runtime.JITFunction):
            fn = fn.fn  # an autotuner's or heuristics' kernel
        consts = {
            k: tl.str_to_ty(v['tl_dtype'], None) if isinstance(v, dict) else v
            for k, v in constexprs.items()
        }
        # The interpreter's bfloat16 workaround is not compiled on CUDA.
        if 'UPCAST' in consts:
            consts['UPCAST'] = False
        names = list(signature)
        spec = {(names.index(a), ): [['tt.divisibility', 16]] for a in attrs}
        compiled = triton.compile(
            ASTSource(fn, signature, consts, spec),
            target=GPUTarget('cuda', 90, 32),
            options=options)
        facts = ptxas_facts(compiled)
        results.append(dict(facts, num_warps=options.get('num_warps', 4)))
    with open(dst, 'w') as f:
        json.dump(results, f)


# ---------------------------------------------------------------------------
# The roofline
# ---------------------------------------------------------------------------
def occupancy(facts: dict) -> Tuple[int, float]:
    """(blocks per SM, occupancy) from registers, warps and shared
    memory."""
    a = ASSUMPTIONS
    warps = facts['num_warps']
    regs = max(1, -(-facts['registers'] // 8) * 8)  # allocated in 8s
    by_regs = a['regs_per_sm'] // (regs * 32 * warps)
    by_smem = (
        a['smem_per_sm'] // (facts['shared'] + a['smem_reserved_per_block'])
        if facts['shared'] else a['max_blocks_per_sm'])
    blocks = max(
        1,
        min(by_regs, by_smem, a['max_warps_per_sm'] // warps,
            a['max_blocks_per_sm']))
    return blocks, blocks * warps / a['max_warps_per_sm']


def launch_us(launch: Launch, facts: dict) -> float:
    """Launch latency plus the waves of the roofline."""
    a = ASSUMPTIONS
    blocks, _ = occupancy(facts)
    sms = a['sms']
    rate_f = a['tflops_bf16'] * 1e12 * a['flops_fraction'] / sms
    rate_b = a['tbps'] * 1e12 * a['bytes_fraction'] / sms
    f_p = launch.flops / max(1, launch.programs)
    b_p = launch.bytes / max(1, launch.programs)
    left, body = launch.programs, 0.
    while left > 0:
        wave = min(left, sms * blocks)
        left -= wave
        per_sm = -(-wave // sms)  # programs sharing the busiest SM
        active = min(sms, wave)
        bw = rate_b * min(a['sm_bandwidth_boost'], sms / active)
        body += per_sm * max(f_p / rate_f, b_p / bw)
    return a['launch_us'] + body * 1e6


def ops_us(ops: List[TorchOp]) -> float:
    a = ASSUMPTIONS
    bw = a['tbps'] * 1e12 * a['bytes_fraction']
    return sum(op.kernels * a['launch_us'] + op.bytes / bw * 1e6 for op in ops)


def _pairs(plan) -> Tuple[int, int, int]:
    """(FSLA query-key pairs, keys borrowed from siblings, 7x7-window
    pairs) of one head of one sample."""
    S = plan.slot_size
    n = plan.slot_valid.view(-1, S).sum(1).tolist()
    pairs = borrowed = 0
    for c, own in enumerate(n):
        lent = min(n[c ^ 1], plan.overlap) if len(n) > 1 else 0
        pairs += own * (own + lent)
        borrowed += lent
    side = int(round(math.sqrt(plan.num_tokens)))
    win = 0
    for r0 in range(0, side, 7):
        for c0 in range(0, side, 7):
            t = min(7, side - r0) * min(7, side - c0)
            win += t * t
    return pairs, borrowed, win


def useful_flops(plan, batch: int, heads: int, d: int) -> Tuple[int, int]:
    """Useful attention FLOPs of FSLA and of 7x7 windows (14 d per query
    and key pair: two products forward, five backward)."""
    pairs, _, win = _pairs(plan)
    scale = batch * heads * 14 * d
    return pairs * scale, win * scale


# The premises of the floor (``--floor``), printed with it.
FLOOR_PREMISES = (
    'the roofline of the model (bytes at {bytes_fraction:.0%} of {tbps} '
    'TB/s, FLOPs at {flops_fraction:.0%} of {tflops_bf16:.0f} TFLOP/s, '
    'overlapped; {launch_us:.0f} us per dependent launch; no L2: every '
    'byte from HBM once per pass)',
    'attention forward: one launch; reads q, k, v once, the keys and '
    'values each cluster borrows from its sibling, the permutation; '
    'writes the output, the log-sum-exp and the channels-last value '
    'image; 4 d FLOPs per real query-key pair',
    'attention backward: one launch; reads q, k, v (and the borrowed '
    'keys and values), the permutation, the output, the gradients of the '
    'output and of the value image, the log-sum-exp; writes the qkv '
    'gradient; 10 d FLOPs per pair',
    'clustering: one launch; reads q once and writes the permutation '
    '(int64); and for each level whose nodes hold more than SORT_MAX = '
    '{sort_max} slots (more than one program can hold), kmeans_iters + 1 '
    '= {passes} more passes over q (each k-means step and the final '
    'ratios need the whole node\'s sums of the step before, a grid-wide '
    'exchange, and a ticket-ordered kernel that the interpreter can run '
    'keeps nothing on chip across one); nothing else (no keys, ranks, '
    'partial sums or initial centroids)',
    'window attention (its floor): forward reads q, k, v and writes the '
    'output and log-sum-exp; backward reads q, k, v, output, its gradient '
    'and the log-sum-exp and writes the qkv gradient; one launch each',
)


def floor_terms(shape, plan, batch: int) -> List[dict]:
    """The least a forward+backward of FSLA (and of the 7x7 window
    attention) can cost with this op's contract, term by term (see
    :data:`FLOOR_PREMISES`): one dict per launch with its ``terms``
    (name, bytes) and FLOPs."""
    from boat_mm.ops._library import _lse_dtype
    from boat_mm.ops.triton.clustering import SORT_MAX
    side, dims, heads = shape
    N, d, elem = side * side, dims // heads, 2  # bfloat16
    lse_elem = torch.tensor([],
                            dtype=_lse_dtype(torch.bfloat16)).element_size()
    rows = batch * heads
    slots = plan.slot_size << plan.num_levels
    pairs, borrowed, win = _pairs(plan)
    q = batch * N * dims * elem
    qkv, out = 3 * q, q
    perm = rows * slots * 8
    lse = rows * slots * lse_elem
    lent = rows * borrowed * 2 * d * elem
    big = [
        lv for lv in range(plan.num_levels)
        if plan.slot_size << (plan.num_levels - lv) > SORT_MAX
    ]
    passes = (KMEANS_ITERS + 1) * len(big)
    win_lse = rows * N * lse_elem
    fsla = [
        dict(
            stage='clustering',
            flops=0,
            terms=[('read q', q), ('write the permutation', perm),
                   ('passes over q', passes * q)],
            detail={
                'passes over q':
                f'{passes}: {len(big)} levels of nodes > {SORT_MAX} '
                f'slots x {KMEANS_ITERS + 1}'
            }),
        dict(
            stage='attention forward',
            flops=4 * d * pairs * rows,
            terms=[('read q, k, v', qkv), ('read borrowed k, v', lent),
                   ('read the permutation', perm), ('write the output', out),
                   ('write the log-sum-exp', lse),
                   ('write the value image', out)]),
        dict(
            stage='attention backward',
            flops=10 * d * pairs * rows,
            terms=[('read q, k, v', qkv), ('read borrowed k, v', lent),
                   ('read the permutation', perm), ('read the output', out),
                   ('read the output gradient', out),
                   ('read the value image gradient', out),
                   ('read the log-sum-exp', lse),
                   ('write the qkv gradient', qkv)]),
    ]
    window = [
        dict(
            stage='window forward',
            flops=4 * d * win * rows,
            terms=[('read q, k, v', qkv), ('write the output', out),
                   ('write the log-sum-exp', win_lse)]),
        dict(
            stage='window backward',
            flops=10 * d * win * rows,
            terms=[('read q, k, v', qkv), ('read the output', out),
                   ('read the output gradient', out),
                   ('read the log-sum-exp', win_lse),
                   ('write the qkv gradient', qkv)]),
    ]
    a = ASSUMPTIONS
    bw = a['tbps'] * 1e12 * a['bytes_fraction']
    fl = a['tflops_bf16'] * 1e12 * a['flops_fraction']
    for is_fsla, launches in ((True, fsla), (False, window)):
        for launch in launches:
            launch['fsla'] = is_fsla
            launch['bytes'] = sum(b for _, b in launch['terms'])
            launch['us'] = a['launch_us'] + 1e6 * max(launch['bytes'] / bw,
                                                      launch['flops'] / fl)
    return fsla + window


def floor_premises() -> List[str]:
    from boat_mm.ops.triton.clustering import SORT_MAX
    return [
        p.format(**ASSUMPTIONS, sort_max=SORT_MAX, passes=KMEANS_ITERS + 1)
        for p in FLOOR_PREMISES
    ]


def _is_attention(launch: Launch) -> bool:
    return launch.module.endswith('clustered_attention')


def model_shape(shape, rec: dict, facts: Dict[str, dict]) -> Tuple[dict, dict]:
    side, dims, heads = shape
    fsla, window = rec['fsla'], rec['window']
    useful, useful_win = useful_flops(rec['plan'], BATCH, heads, dims // heads)
    floor = floor_terms(shape, rec['plan'], BATCH)
    floor_us = {
        key: sum(x['us'] for x in floor if x['fsla'] == (key == 'fsla'))
        for key in ('fsla', 'window')
    }
    attn = [x for x in fsla.launches if _is_attention(x)]
    t = {}
    for key, r in (('fsla', fsla), ('window', window)):
        t[key] = (
            sum(launch_us(x, facts[x.variant()])
                for x in r.launches) + ops_us(r.ops))
    kernels, seen = [], set()
    for x in fsla.launches:
        if x.kernel in seen:
            continue
        seen.add(x.kernel)
        f = facts[x.variant()]
        kernels.append(
            dict(
                name=x.kernel,
                registers=f['registers'],
                spills=f['spills'],
                occupancy=round(occupancy(f)[1], 3)))
    clus = [x for x in fsla.launches if not _is_attention(x)]
    extra = dict(
        attention_launches=len(attn),
        clustering_launches=len(clus),
        torch_kernels=sum(op.kernels for op in fsla.ops if not op.sort),
        sort_kernels=sum(op.kernels for op in fsla.ops if op.sort),
        fsla_bytes=sum(x.bytes
                       for x in fsla.launches) + sum(op.bytes
                                                     for op in fsla.ops),
        window_bytes=sum(x.bytes for x in window.launches),
        window_over_useful=sum(x.flops for x in window.launches) / useful_win,
        attention_us=sum(launch_us(x, facts[x.variant()]) for x in attn),
        attention_kernels=[(x.kernel, facts[x.variant()]['registers'],
                            occupancy(facts[x.variant()])[1]) for x in attn],
        floor=floor)
    record = {
        'shape': [side, dims, heads],
        'launches':
        len(fsla.launches) + sum(op.kernels for op in fsla.ops if not op.sort),
        'sorts':
        sum(op.sort for op in fsla.ops),
        'executed_over_useful':
        round(sum(x.flops for x in attn) / useful, 3),
        'kernels':
        kernels,
        'predicted_us': {
            k: round(v, 1)
            for k, v in t.items()
        },
        'ratio':
        round(t['fsla'] / t['window'], 2),
        'batch':
        BATCH,
        'floor_us': {
            k: round(v, 1)
            for k, v in floor_us.items()
        },
        'floor_ratio':
        round(floor_us['fsla'] / t['window'], 2),
        'floor_over_window_floor':
        round(floor_us['fsla'] / floor_us['window'], 2),
        'floor': [
            dict(
                stage=x['stage'],
                us=round(x['us'], 1),
                bytes=x['bytes'],
                flops=x['flops'],
                terms=dict(x['terms'])) for x in floor
        ],
    }
    return record, extra


def print_table(rows, variants: Tuple[int, int]) -> None:
    a = ASSUMPTIONS
    print(f'GPU model (not a measurement): one forward+backward, batch '
          f'{BATCH}, bf16, H100 SXM as {a["sms"]} SMs, '
          f'{a["flops_fraction"]:.0%} of {a["tflops_bf16"]:.0f} TFLOP/s, '
          f'{a["bytes_fraction"]:.0%} of {a["tbps"]} TB/s, '
          f'{a["launch_us"]:.0f} us per launch\n')
    print('| tokens (C, heads) | launches (clust + attn + torch) | '
          'torch.sort | attention executed/useful | MB moved fsla / window | '
          'attn registers (occupancy) | predicted us fsla / window '
          '(attn) | fsla/window |')
    print('|---|---|---|---|---|---|---|---|')
    for rec, ex in rows:
        side, dims, heads = rec['shape']
        regs = ' / '.join(f'{r} ({o:.0%})'
                          for _, r, o in ex['attention_kernels'])
        print(f'| {side}^2 ({dims}, {heads}) | {rec["launches"]} '
              f'({ex["clustering_launches"]} + {ex["attention_launches"]} '
              f'+ {ex["torch_kernels"]}) | {rec["sorts"]} '
              f'({ex["sort_kernels"]} kernels) | '
              f'{rec["executed_over_useful"]:.2f} | '
              f'{ex["fsla_bytes"] / 1e6:.0f} / '
              f'{ex["window_bytes"] / 1e6:.0f} | {regs} | '
              f'{rec["predicted_us"]["fsla"]:.0f} / '
              f'{rec["predicted_us"]["window"]:.0f} '
              f'({ex["attention_us"]:.0f}) | {rec["ratio"]:.2f}x |')
    print(f'\ncompiled variants for these shapes: {variants[0]} '
          f'clustering + {variants[1]} attention')


def print_floor(rows) -> None:
    """The floor beside the model's prediction, its premises and terms."""
    print('\nfloor (the least any design of this structure costs, under '
          'the premises below):\n')
    print('| tokens (C, heads) | predicted us fsla / window | fsla/window | '
          'floor us fsla (clustering + forward + backward) | floor / '
          'predicted window | window floor us | floor / window floor |')
    print('|---|---|---|---|---|---|---|')
    for rec, ex in rows:
        side, dims, heads = rec['shape']
        parts = ' + '.join(f'{x["us"]:.0f}' for x in ex['floor'] if x['fsla'])
        print(f'| {side}^2 ({dims}, {heads}) | '
              f'{rec["predicted_us"]["fsla"]:.0f} / '
              f'{rec["predicted_us"]["window"]:.0f} | {rec["ratio"]:.2f}x | '
              f'{rec["floor_us"]["fsla"]:.0f} ({parts}) | '
              f'{rec["floor_ratio"]:.2f}x | {rec["floor_us"]["window"]:.0f} '
              f'| {rec["floor_over_window_floor"]:.2f}x |')
    print('\npremises:')
    for premise in floor_premises():
        print(f'- {premise}')
    for rec, ex in rows:
        side, dims, heads = rec['shape']
        print(f'\nfloor terms of {side}^2 (C {dims}, {heads} heads, batch '
              f'{rec["batch"]}):')
        print('| launch | term | MB |')
        print('|---|---|---|')
        for x in ex['floor']:
            for name, nbytes in x['terms']:
                if name in x.get('detail', {}):
                    name = f'{name} ({x["detail"][name]})'
                print(f'| {x["stage"]} | {name} | {nbytes / 1e6:.1f} |')
            print(f'| {x["stage"]} | = {x["bytes"] / 1e6:.1f} MB, '
                  f'{x["flops"] / 1e9:.2f} GFLOP: {x["us"]:.1f} us | |')


def print_kernels(launches: List[Launch], facts: Dict[str, dict]) -> None:
    print('\n| kernel | variants | registers | spills (bytes) | '
          'shared (bytes) | warps | occupancy |')
    print('|---|---|---|---|---|---|---|')
    by_kernel: Dict[str, List[str]] = {}
    for x in launches:
        by_kernel.setdefault(x.kernel, [])
        if x.variant() not in by_kernel[x.kernel]:
            by_kernel[x.kernel].append(x.variant())
    for kernel, vs in by_kernel.items():
        fs = [facts[v] for v in vs]

        def span(key, fs=fs):
            lo, hi = min(f[key] for f in fs), max(f[key] for f in fs)
            return str(lo) if lo == hi else f'{lo}-{hi}'

        occ = sorted({occupancy(f)[1] for f in fs})
        print(f'| {kernel} | {len(vs)} | {span("registers")} | '
              f'{span("spills")} | {span("shared")} | {span("num_warps")} '
              f'| {" / ".join(f"{o:.1%}" for o in occ)} |')


def print_launches(recs: dict, facts: Dict[str, dict]) -> None:
    for shape, rec in recs.items():
        print(f'\nlaunches of {shape[0]}^2 (C {shape[1]}, {shape[2]} heads):')
        print('| what | kernel | grid | GFLOP | MB | predicted us |')
        print('|---|---|---|---|---|---|')
        for key in ('fsla', 'window'):
            for x in rec[key].launches:
                print(f'| {key} | {x.kernel} | {x.grid} | '
                      f'{x.flops / 1e9:.2f} | {x.bytes / 1e6:.1f} | '
                      f'{launch_us(x, facts[x.variant()]):.1f} |')
            for op in rec[key].ops:
                print(f'| {key} | torch {op.name} | {op.kernels} kernels | '
                      f'- | {op.bytes / 1e6:.1f} | {ops_us([op]):.1f} |')


def sweep_variants() -> Tuple[Tuple[int, int], List[Tuple[int, int]]]:
    """Distinct compiled variants (clustering and attention) over 20
    token-map sizes from 33x47 to 129x97 (C 64, 2 heads, batch 8)."""
    sizes = [(round(33 + i * 96 / 19), round(47 + i * 50 / 19))
             for i in range(20)]
    variants = set()
    for h, w in sizes:
        rec = _record_hw(h, w, 64, 2)
        variants.update((_is_attention(x), x.variant()) for x in rec.launches)
    attention = sum(a for a, _ in variants)
    return (len(variants) - attention, attention), sizes


def _record_hw(H: int, W: int, dims: int, heads: int) -> Recorder:
    from boat_mm.ops import (balanced_hierarchical_clustering,
                             build_cluster_plan, clustered_attention)
    N, d = H * W, dims // heads
    plan = build_cluster_plan(N, 49, 20, 'cpu')
    qkv = torch.zeros(BATCH, N, 3 * dims, dtype=torch.bfloat16)
    q = qkv[..., :dims].reshape(BATCH, N, heads, d).transpose(1, 2)
    rec = Recorder(sample=False)
    with recording(rec):
        balanced_hierarchical_clustering(
            q.reshape(BATCH * heads, N, d),
            plan,
            KMEANS_ITERS,
            TEMPERATURE,
            impl='triton')
        x = qkv.clone().requires_grad_()
        out, image = clustered_attention(
            x,
            _random_perm(plan, BATCH * heads),
            plan,
            heads,
            hw_shape=(H, W),
            impl='triton')
        torch.autograd.backward(
            (out, image), (torch.zeros_like(out), torch.zeros_like(image)))
    return rec


def check_window() -> None:
    """The window-attention kernels against plain attention per window in
    float64 (interpreter)."""
    from _window_attention import (window_attention_backward,
                                   window_attention_forward)
    H, W, heads, dims = 9, 12, 2, 32
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(
        2, H * W, 3 * dims, dtype=torch.float64,
        generator=gen).requires_grad_()
    g = torch.randn(2, H * W, dims, dtype=torch.float64, generator=gen)
    out, lse = window_attention_forward(qkv.detach(), (H, W), heads)
    grad = window_attention_backward(g, qkv.detach(), out, lse, (H, W), heads)
    win = torch.arange(H * W)
    win = (win // W // 7) * 10 + (win % W // 7)
    mask = win[:, None] == win[None, :]
    q, k, v = qkv.view(2, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, H * W, dims)
    ref_grad, = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)
    print('window attention kernels: equal to plain attention per window')


def main() -> None:
    global EXACT_ATOMICS, BATCH
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', help='write one record per shape here')
    parser.add_argument(
        '--sweep',
        action='store_true',
        help='count compiled variants over 20 sizes too')
    parser.add_argument(
        '--check', action='store_true', help='check the window kernels')
    parser.add_argument(
        '--cache-dir',
        default=osp.join('work_dirs', 'gpu_model_triton_cache'),
        help='Triton cache of the sm_90 compiles')
    parser.add_argument(
        '--kernels', action='store_true', help='print per-kernel facts')
    parser.add_argument(
        '--launches', action='store_true', help='print every launch')
    parser.add_argument(
        '--exact-atomics',
        action='store_true',
        help='run every program of kernels with atomics (slow)')
    parser.add_argument(
        '--floor',
        action='store_true',
        help='print the least FSLA can cost, its premises and terms')
    parser.add_argument(
        '--shape',
        nargs=3,
        type=int,
        action='append',
        metavar=('SIDE', 'C', 'HEADS'),
        help='model this shape instead of the three stages (repeatable)')
    parser.add_argument(
        '--batch', type=int, default=BATCH, help='batch size (default 8)')
    parser.add_argument('--compile-worker', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_worker:
        _compile_worker(*args.compile_worker)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    EXACT_ATOMICS = args.exact_atomics
    BATCH = args.batch
    shapes = [tuple(x) for x in args.shape] if args.shape else SHAPES
    if args.check:
        check_window()
    recs = {shape: record_shape(*shape, batch=BATCH) for shape in shapes}
    for (side, _, _), rec in recs.items():
        syncs = rec['fsla'].syncs
        if syncs:
            WARNINGS.add(f'FSLA at {side}^2 reads {len(syncs)} values back '
                         f'to the host ({", ".join(sorted(set(syncs)))}): '
                         f'each a GPU sync, not in the predicted time')
    launches = [
        x for r in recs.values() for k in ('fsla', 'window')
        for x in r[k].launches
    ]
    variants = sorted({x.variant() for x in launches})
    facts = compile_variants(variants, osp.abspath(args.cache_dir))
    rows = [model_shape(s, recs[s], facts) for s in shapes]
    fsla = {(_is_attention(x), x.variant())
            for r in recs.values()
            for x in r['fsla'].launches}
    attention = sum(a for a, _ in fsla)
    fsla_variants = (len(fsla) - attention, attention)
    print_table(rows, fsla_variants)
    for warning in sorted(WARNINGS):
        print(f'note: {warning}')
    if args.floor:
        print_floor(rows)
    if args.kernels:
        print_kernels(launches, facts)
    if args.launches:
        print_launches(recs, facts)
    if args.sweep:
        (clus, attn), sizes = sweep_variants()
        print(f'compiled variants over 20 sizes from {sizes[0][0]}x'
              f'{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]} (C 64, 2 '
              f'heads): {clus} clustering + {attn} attention')
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump([r for r, _ in rows], f, indent=1)


if __name__ == '__main__':
    main()
