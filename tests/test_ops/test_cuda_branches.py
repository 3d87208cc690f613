# Copyright (c) boat-mm contributors. All rights reserved.
"""The CUDA-only branches of the FSLA ops' Python, run on the CPU.

What only a GPU run would reach (coverage of the CPU suite:
docs/test_mutations.md): the Triton op running on the GPU of its input,
the forward's check, before it launches, that a training step's backward
fits the GPU, the launches for CUDA tensors, and the shared-memory check
where Triton's internals differ. CUDA tensors are fake tensors
(``FakeTensorMode``: device and shape, no data), the kernels are
stand-ins that record their launches; nothing is launched. The kernels'
input checks, which refuse before any launch, run here too.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from boat_mm.ops import _library, build_cluster_plan
from boat_mm.ops._library import KernelResourcesError

triton = pytest.importorskip('triton')

from boat_mm.ops.triton import clustered_attention as tca  # noqa: E402
from boat_mm.ops.triton import clustering as tc  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason='stands in for a GPU; benchmarks/gpu_check.sh runs the real one')


class _Launches:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **consts)``
    records the launch."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _cuda_problem(dtype=torch.float32,
                  requires_grad=False,
                  batch=2,
                  n=98,
                  dims=32,
                  heads=2,
                  device='cuda:1'):
    """Fake CUDA inputs of the attention op (shapes of a plan of ``n``
    tokens; no values), the plan and the fake mode to call in."""
    plan = build_cluster_plan(n, 49, 20)
    mode = FakeTensorMode()
    with mode:
        qkv = torch.empty(
            batch,
            n,
            3 * dims,
            dtype=dtype,
            device=device,
            requires_grad=requires_grad)
        slots = plan.slot_valid.numel()
        perm = torch.empty(
            batch * heads, slots, dtype=torch.long, device=device)
        valid = torch.empty(slots, dtype=torch.bool, device=device)
    return mode, qkv, perm, valid, plan


def test_triton_op_runs_on_the_gpu_of_its_input(monkeypatch):
    """The ``boat_mm_triton`` kernels launch on the current GPU, so the
    op makes its input's GPU current around the call (on cuda:1 with
    cuda:0 current, a launch on the wrong GPU); CPU inputs (the
    interpreter) need no device."""
    current, ran = ['cuda:0'], []

    @contextlib.contextmanager
    def device(d):
        before = current[0]
        current[0] = str(torch.device(d))
        yield
        current[0] = before

    def kernel_fn(*args):
        ran.append((args, current[0]))
        return 'result'

    monkeypatch.setattr(torch.cuda, 'device', device)
    monkeypatch.setattr(_library, 'triton_function', lambda name: kernel_fn)
    kernel = _library._lazy_triton('clustered_attention')
    mode, qkv, perm, *_ = _cuda_problem(device='cuda:1')
    with mode:
        assert kernel(qkv, perm, 2) == 'result'
    assert ran[-1][0] == (qkv, perm, 2)
    assert ran[-1][1] == 'cuda:1' and current == ['cuda:0']
    cpu = torch.zeros(2)
    assert kernel(cpu, 3) == 'result'
    assert ran[-1] == ((cpu, 3), 'cuda:0')


@pytest.mark.parametrize('dtype',
                         [torch.float32, torch.bfloat16, torch.float64])
def test_forward_on_cuda_checks_the_backward_before_it_launches(
        monkeypatch, dtype):
    """A CUDA forward whose input requires grad (a training step) asks
    whether the backward of its sizes fits the input's GPU, and refuses
    before launching where it does not, naming the backward, its bytes
    and the GPU's; where it fits, or without grad, it launches one
    program per cluster and sample x head, with the CUDA configuration
    (bfloat16 products are not upcast, as in the interpreter)."""
    asked = []
    verdict = [(300000, 232448)]

    def kernel_too_large(*args):
        asked.append(args)
        return verdict[0]

    launches = _Launches()
    monkeypatch.setattr(tca, '_kernel_too_large', kernel_too_large)
    monkeypatch.setattr(tca, '_forward_kernel', launches)
    mode, qkv, perm, valid, plan = _cuda_problem(dtype, requires_grad=True)
    args = (qkv, perm, valid, 2, plan.slot_size, 20, 0.25, [7, 14])
    with mode, pytest.raises(KernelResourcesError) as err:
        tca.clustered_attention_forward(*args)
    assert asked == [('bwd', dtype, 16, plan.slot_size, 20, 2, 1)]
    for part in ('backward needs 300000 bytes', 'this GPU has 232448',
                 str(dtype), "attention_impl='tensor'"):
        assert part in str(err.value), part
    # Autocast is advice for 32-bit inputs only: 16-bit ones are 16-bit.
    assert ('Run under bfloat16 or float16 autocast' in str(err.value)) == (
        dtype == torch.float32)
    assert launches.calls == []

    verdict[0] = None
    with mode:
        out, image, lse = tca.clustered_attention_forward(*args)
    assert len(asked) == 2 and len(launches.calls) == 1
    grid, launched, consts = launches.calls[0]
    assert grid == (plan.num_clusters, 2 * 2)
    assert launched[0] is qkv and launched[3] is out
    assert launched[5] is image and launched[4] is lse
    assert consts['UPCAST'] is False and consts['HAS_IMAGE'] is True
    assert consts['D'] == 16
    assert out.device == image.device == lse.device == torch.device('cuda:1')
    assert out.shape == (2, 98, 32) and image.shape == (2, 32, 7, 14)
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert lse.shape == perm.shape
    assert lse.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)

    # Inference: no backward follows, nothing to check.
    mode, qkv, perm, valid, plan = _cuda_problem(dtype, requires_grad=False)
    with mode:
        tca.clustered_attention_forward(qkv, perm, valid, 2, plan.slot_size,
                                        20, 0.25, [])
    assert len(asked) == 2 and len(launches.calls) == 2
    assert launches.calls[1][2]['HAS_IMAGE'] is False


def test_backward_on_cuda_launches_one_program_per_sibling_pair(monkeypatch):
    """The backward of CUDA inputs: one program per sibling pair and
    sample x head, the qkv gradient on the input's GPU."""
    launches = _Launches()
    monkeypatch.setattr(tca, '_backward_kernel', launches)
    mode, qkv, perm, valid, plan = _cuda_problem(torch.bfloat16, batch=3)
    with mode:
        grad_out = torch.empty(3, 98, 32, dtype=qkv.dtype, device=qkv.device)
        grad_image = torch.empty(
            3, 32, 7, 14, dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty(perm.shape, device=qkv.device)
        grad = tca.clustered_attention_backward(grad_out, grad_image, qkv,
                                                perm, valid, lse, 2,
                                                plan.slot_size, 20, 0.25)
    (grid, launched, consts), = launches.calls
    assert grid == ((plan.num_clusters + 1) // 2, 3 * 2)
    assert launched[6] is grad and consts['HAS_IMAGE'] is True
    assert consts['UPCAST'] is False
    assert grad.shape == qkv.shape and grad.device == torch.device('cuda:1')


def _fit_config(dtype=torch.float32):
    cfg = tca._launch_config(dtype, 32, 49, 20, torch.device('cuda', 0))
    return tuple(sorted(cfg.items()))


@pytest.mark.triton
def test_fit_check_compares_the_kernel_with_the_gpu(monkeypatch):
    """The shared-memory check compiles the kernel for the GPU (stood in
    for) and refuses exactly when it needs more than the GPU gives a
    block."""
    import triton.compiler.compiler as compiler
    shared = dict(fwd=4096, bwd=4097)
    monkeypatch.setattr(torch.cuda, 'device',
                        lambda index: contextlib.nullcontext())
    monkeypatch.setattr(
        tca, '_warmup', lambda kernel, *args: SimpleNamespace(
            metadata=SimpleNamespace(shared=shared[kernel])))
    monkeypatch.setattr(compiler, 'max_shared_mem', lambda index: 4096)
    check = tca._fit_check.__wrapped__  # uncached
    assert check('fwd', torch.float32, 49, 20, 2, 0, _fit_config()) is None
    assert check('bwd', torch.float32, 49, 20, 2, 0,
                 _fit_config()) == (4097, 4096)


@pytest.mark.triton
def test_fit_check_warns_where_triton_cannot_tell(monkeypatch):
    """A Triton whose internals differ (the check compiles without
    launching through them) gets no answer, and a warning naming the
    failure and the Triton version, not an error: the launch then
    checks."""

    def broken(*args):
        raise AttributeError("'CompiledKernel' object has no attribute "
                             "'metadata'")

    monkeypatch.setattr(torch.cuda, 'device',
                        lambda index: contextlib.nullcontext())
    monkeypatch.setattr(tca, '_warmup', broken)
    check = tca._fit_check.__wrapped__
    with pytest.warns(UserWarning) as caught:
        assert check('bwd', torch.float32, 49, 20, 2, 0, _fit_config()) is None
    message = str(caught[0].message)
    for part in ('could not check', 'AttributeError', "no attribute "
                 "'metadata'", f'triton version ({triton.__version__})'):
        assert part in message, part


# ---------------------------------------------------------------------------
# The kernels' own input checks (before any launch): what a direct call of
# torch.ops.boat_mm.<op> on CUDA tensors, or of boat_mm_triton's, meets.
# ---------------------------------------------------------------------------


def _cpu_problem():
    plan = build_cluster_plan(98, 49, 20)
    qkv = torch.zeros(2, 98, 96)
    perm = torch.zeros(4, plan.slot_valid.numel(), dtype=torch.long)
    return qkv, perm, plan.slot_valid, plan


# (what to change in (qkv, perm, valid, heads, slot_size, overlap), the
# message).
BAD_FORWARD = [
    (lambda a: dict(qkv=a['qkv'][..., :95]), 'qkv of shape'),
    (lambda a: dict(qkv=a['qkv'].int()), 'support float32, bfloat16'),
    (lambda a: dict(heads=3), r'num_heads \(3\) must divide the 32'),
    (lambda a: dict(slot_size=0), 'slot_size must be >= 1 and overlap'),
    (lambda a: dict(overlap=-1), 'slot_size must be >= 1 and overlap'),
    (lambda a: dict(valid=a['valid'].int()), '1-d bool tensor'),
    (lambda a: dict(valid=a['valid'][:60]), 'whole sibling pairs'),
    (lambda a: dict(perm=a['perm'].int()), 'perm must be int64'),
    (lambda a: dict(perm=a['perm'][:3]), r'\(B \* num_heads, slots\) = '
     r'\(4, 98\)'),
    (lambda a: dict(perm=a['perm'][:, :97]), r'\(B \* num_heads, slots\) = '
     r'\(4, 98\)'),
    # Wider: the rows of tokens it does not cover were left unwritten.
    (lambda a: dict(perm=torch.cat([a['perm'], a['perm'][:, :2]], 1)),
     r'\(B \* num_heads, slots\) = \(4, 98\)'),
    (lambda a: dict(valid=a['valid'].to('meta')), 'on the device of qkv'),
]


@pytest.mark.parametrize('change,message', BAD_FORWARD)
def test_attention_kernels_refuse_bad_input(change, message):
    qkv, perm, valid, plan = _cpu_problem()
    args = dict(
        qkv=qkv,
        perm=perm,
        valid=valid,
        heads=2,
        slot_size=plan.slot_size,
        overlap=20)
    args.update(change(args))
    args = list(args.values())
    with pytest.raises(RuntimeError, match=message):
        tca.clustered_attention_forward(*args, 0.25, [])
    grad_out = torch.zeros(2, 98, 32)
    with pytest.raises(RuntimeError, match=message):
        tca.clustered_attention_backward(grad_out,
                                         grad_out.new_empty(0), *args[:3],
                                         torch.zeros(4, 98), *args[3:], 0.25)


def test_attention_kernels_refuse_mismatched_shapes():
    qkv, perm, valid, plan = _cpu_problem()
    args = (qkv, perm, valid, 2, plan.slot_size, 20, 0.25)
    with pytest.raises(RuntimeError, match=r'hw_shape \[7, 7\] does not'):
        tca.clustered_attention_forward(*args, [7, 7])
    lse = torch.zeros(perm.shape)
    image = torch.zeros(2, 32, 7, 14)

    def backward(grad_out, grad_image, lse):
        tca.clustered_attention_backward(grad_out, grad_image, qkv, perm,
                                         valid, lse, 2, plan.slot_size, 20,
                                         0.25)

    with pytest.raises(RuntimeError, match=r'grad_out must have shape'):
        backward(torch.zeros(2, 98, 16), image, lse)
    with pytest.raises(RuntimeError, match=r'lse must have shape \(4, 98\)'):
        backward(torch.zeros(2, 98, 32), image, lse[:, :50])
    with pytest.raises(RuntimeError, match=r'grad_image must hold'):
        backward(torch.zeros(2, 98, 32), image[..., :7], lse)


BAD_CLUSTERING = [
    ((2, 0, 4), {}, 'N >= 1 tokens of d >= 1 dims'),
    ((2, 20, 0), {}, 'N >= 1 tokens of d >= 1 dims'),
    ((2, 20, 4), dict(num_levels=31), r'num_levels must lie in \[0, 31\)'),
    ((2, 20, 4), dict(dtype=torch.complex64), 'needs real vectors'),
]


@pytest.mark.parametrize('shape,change,message', BAD_CLUSTERING)
def test_clustering_kernel_refuses_bad_input(shape, change, message):
    x = torch.zeros(shape, dtype=change.get('dtype', torch.float32))
    with pytest.raises(ValueError, match=message):
        tc.balanced_clustering(x, change.get('num_levels', 1), 10, 2, 100.)


def test_clustering_kernel_refuses_more_slots_than_int32_indexes():
    # 2**26 rows of 64 slots: 2**32 (an expanded tensor: no memory).
    x = torch.zeros(1, 1, 1).expand(2**26, 40, 1)
    with pytest.raises(ValueError, match='fewer than 2\\*\\*31 slots'):
        tc.balanced_clustering(x, 1, 32, 2, 100.)


@pytest.mark.triton
def test_clustering_kernel_converts_other_real_dtypes_to_float32():
    """Integer vectors are clustered as their float32 values."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-1000, 1000, (2, 40, 4), generator=gen)
    plan = build_cluster_plan(40, 10, 0)
    ours = tc.balanced_clustering(x, plan.num_levels, plan.slot_size, 2, 100.)
    ref = tc.balanced_clustering(x.float(), plan.num_levels, plan.slot_size, 2,
                                 100.)
    assert torch.equal(ours, ref)
