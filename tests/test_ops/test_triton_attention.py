# Copyright (c) boat-mm contributors. All rights reserved.
"""The Triton clustered attention (``boat_mm/ops/triton/
clustered_attention.py``) against the tensor path, the op layer that runs
it (``impl='triton'``, the ``boat_mm_triton`` ops, autograd) and the
backend table's choices and errors.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), at small shapes:
the interpreter runs every program in numpy. With a GPU the same tests
run compiled on CUDA, and the tests marked ``cuda`` add real shapes, host
synchronisation and ``torch.compile`` checks (``benchmarks/gpu_check.sh``).
"""

import pytest
import torch
from _triton_compile import run_compile_script
from attention_problems import assert_low_precision_close, problem
from attention_problems import run as _run
from repo_scripts import load_script

from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         clustered_attention, cpu_kernel_available)

pytest.importorskip('triton')

from triton.runtime.errors import OutOfResources  # noqa: E402

from boat_mm.ops import _backends  # noqa: E402
from boat_mm.ops._library import KernelResourcesError  # noqa: E402
from boat_mm.ops.triton import clustered_attention as tca  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'


def _problem(*args, device=DEVICE, **kwargs):
    return problem(*args, device=device, **kwargs)


# (H, W, C, heads, overlap): uniform N = 49 * 4 (head dims 16), padded N
# = 143 (clusters of 35 and 36 tokens, head dims 32), no overlap and one
# head (head dims 64), a single sibling pair (N = 81, clusters of 41 and
# 40 tokens).
CASES = [(14, 14, 32, 2, 20), (11, 13, 64, 2, 20), (13, 13, 64, 1, 0),
         (9, 9, 32, 2, 20)]


@pytest.mark.triton
@pytest.mark.parametrize('h,w,dims,heads,overlap', CASES)
def test_triton_equals_tensor_path_in_float64(h, w, dims, heads, overlap):
    """Outputs, value image and every qkv gradient row, through the public
    function (op, registered autograd, Triton backward)."""
    qkv, perm, plan = _problem((h, w),
                               dims,
                               heads,
                               overlap=overlap,
                               seed=h * w)
    assert plan.num_clusters > 1
    ours = _run('triton', qkv, perm, plan, heads, (h, w))
    ref = _run('tensor', qkv, perm, plan, heads, (h, w))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _force_lent_in_pass(monkeypatch, lent_in_pass: bool) -> None:
    """Launch the backward with the lent keys completed by its second pass
    (as for 16-bit inputs) or after both passes (32- and 64-bit ones),
    whatever the dtype."""
    config = tca._launch_config
    monkeypatch.setattr(
        tca, '_launch_config',
        lambda *args: dict(config(*args), LENT_IN_PASS=lent_in_pass))


def _equals_tensor_path_in_float64(qkv, perm, plan, heads, hw, overlap=20):
    """Triton's outputs, value image and qkv gradient equal the tensor
    path's; on a GPU whose shared memory the float64 backward exceeds (a
    128-row tile: 380 KB of an H100's 227 KB, read off the sm_90
    compile), the forward refuses, saying what to change."""
    d = qkv.shape[-1] // 3 // heads
    if CUDA and tca._kernel_too_large('bwd', torch.float64, d, plan.slot_size,
                                      overlap, heads, qkv.device.index):
        with pytest.raises(KernelResourcesError, match='shared memory'):
            _run('triton', qkv, perm, plan, heads, hw)
        return
    ours = _run('triton', qkv, perm, plan, heads, hw)
    ref = _run('tensor', qkv, perm, plan, heads, hw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# Where the kernels' plan changes: the 64- and 16-row tiles of slot sizes
# 65-80 (N = 130: two clusters of 65), a 16-row tile of borrowed keys
# (overlap 16), at batch 1 and 8.
@pytest.mark.triton
@pytest.mark.parametrize('h,w,overlap,batch', [(10, 13, 20, 1),
                                               (14, 14, 16, 8)])
def test_triton_tile_buckets_in_float64(h, w, overlap, batch):
    qkv, perm, plan = _problem((h, w),
                               32,
                               2,
                               overlap=overlap,
                               batch=batch,
                               seed=h + w)
    _equals_tensor_path_in_float64(qkv, perm, plan, 2, (h, w), overlap)


# The overflow tile (slot sizes 65-80, 65-67 at BOAT's cluster size):
# padded clusters of 66 slots (N = 525), a full 16-row overflow tile
# (clusters of 80, group size 64), padded clusters of 79, clusters of 65
# and 64 (N = 129: one overflow tile all padding), overlap 48 (a 64-row
# tile of borrowed keys), and 81 slots (128-row tiles, no overflow
# tile); the lent keys completed in the second pass (16-bit inputs'
# schedule) or after both. The batch only offsets the programs' sample
# row, which batch 2 already does (batch 8 runs in the tests above and
# below, at four times this one's interpreted programs).
@pytest.mark.triton
@pytest.mark.parametrize('h,w,group,overlap,batch', [(21, 25, 49, 20, 2),
                                                     (10, 16, 64, 20, 1),
                                                     (15, 21, 64, 20, 2),
                                                     (3, 43, 49, 20, 2),
                                                     (10, 13, 49, 48, 2),
                                                     (9, 18, 64, 20, 2)])
@pytest.mark.parametrize('lent_in_pass', [False, True])
def test_triton_overflow_tile_in_float64(h, w, group, overlap, batch,
                                         lent_in_pass, monkeypatch):
    _force_lent_in_pass(monkeypatch, lent_in_pass)
    qkv, perm, plan = _problem((h, w),
                               32,
                               2,
                               batch=batch,
                               group_size=group,
                               overlap=overlap,
                               seed=h * w + batch)
    assert 65 <= plan.slot_size <= 81
    cfg = tca._launch_config(qkv.dtype, 16, plan.slot_size, overlap,
                             qkv.device)
    assert cfg['EXTRA'] == (16 if plan.slot_size <= 80 else 0)
    _equals_tensor_path_in_float64(qkv, perm, plan, 2, (h, w), overlap)


# Where the backward's schedule of one program per sibling pair changes:
# one cluster (no sibling; plans have no odd cluster count above 1) and
# one pair with padded slots (N = 81: clusters of 41 and 40 tokens), at
# batch 1 and 8, and one cluster of 70 slots (group size 64: an overflow
# tile without a sibling); several pairs are in the tests above.
# lent_in_pass: the
# lent keys completed by the second pass, as for 16-bit inputs (else
# after both passes, as for 32- and 64-bit ones).
@pytest.mark.triton
@pytest.mark.parametrize('h,w,batch,lent_in_pass,group',
                         [(6, 7, 1, False, 49), (6, 7, 8, False, 49),
                          (9, 9, 1, False, 49), (9, 9, 8, False, 49),
                          (9, 9, 8, True, 49), (14, 14, 1, True, 49),
                          (7, 10, 2, True, 64), (7, 10, 2, False, 64)])
def test_triton_pair_schedule_in_float64(h, w, batch, lent_in_pass, group,
                                         monkeypatch):
    """The op's outputs and qkv gradient (its registered autograd, the
    Triton backward) against autograd through the tensor path."""
    _force_lent_in_pass(monkeypatch, lent_in_pass)
    qkv, perm, plan = _problem((h, w),
                               16,
                               1,
                               batch=batch,
                               group_size=group,
                               seed=h + batch)
    if plan.num_clusters == 1:
        # The public function runs SDPA for one cluster, so the op is
        # called directly, with any order of the tokens in the slots.
        gen = torch.Generator().manual_seed(batch)
        perm = torch.stack([
            torch.randperm(h * w, generator=gen) for _ in range(batch)
        ]).to(DEVICE)
    out, image, _ = torch.ops.boat_mm_triton.clustered_attention(
        qkv, perm, plan.slot_valid, 1, plan.slot_size, plan.overlap, 0.25,
        [h, w])
    ref = clustered_attention(
        qkv, perm, plan, 1, scale=0.25, hw_shape=(h, w), impl='tensor')
    gen = torch.Generator().manual_seed(1)
    g_out, g_img = (
        torch.randn(t.shape, generator=gen, dtype=t.dtype).to(DEVICE)
        for t in ref)
    grads = [
        torch.autograd.grad((o * g_out).sum() + (i * g_img).sum(), qkv)[0]
        for o, i in ((out, image), ref)
    ]
    for a, b in zip((out, image, grads[0]), (*ref, grads[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.triton
def test_triton_tiles_are_bucketed():
    """Only tile sizes of the slot size and overlap reach the compiler:
    every slot size from 33 to 64 gives the same constants (the sizes
    themselves are run-time arguments Triton does not specialise on), as
    does every one from 65 to 80 (a 64-row tile and a 16-row overflow
    tile, which holds no lent keys); 81 and up take 128-row tiles."""
    from boat_mm.ops.triton import clustered_attention as kernels
    cuda = torch.device('cuda')

    def cfg(slots, overlap=20):
        return kernels._launch_config(torch.bfloat16, 32, slots, overlap, cuda)

    assert all(cfg(s) == cfg(49) for s in range(33, 65))
    assert all(cfg(s) == cfg(66) for s in range(65, 81))
    assert (cfg(49)['BLOCK_S'], cfg(49)['EXTRA']) == (64, 0)
    assert (cfg(66)['BLOCK_S'], cfg(66)['EXTRA']) == (64, 16)
    assert (cfg(81)['BLOCK_S'], cfg(81)['EXTRA']) == (128, 0)
    # Lent keys beyond the first tile: no overflow tile.
    assert (cfg(66, 65)['BLOCK_S'], cfg(66, 65)['EXTRA']) == (128, 0)
    assert cfg(49, 16)['TAIL'] == 16 and cfg(49)['TAIL'] == 32
    for kernel in (kernels._forward_kernel, kernels._backward_kernel):
        fixed = set(kernel.arg_names) & {'S', 'N', 'overlap', 'G'}
        assert fixed and fixed <= set(_no_specialisation(kernel))


def _no_specialisation(kernel) -> list:
    """The arguments a Triton kernel (compiled or interpreted) is not
    specialised on."""
    names = getattr(kernel, 'do_not_specialize', None)
    if names is None:  # interpreted: the jit arguments
        names = kernel.kwargs.get('do_not_specialize', [])
    return [kernel.arg_names[n] if isinstance(n, int) else n for n in names]


@pytest.mark.triton
def test_triton_only_the_image_reaches_the_loss():
    """The backward of an output that is not used gets no zero tensor
    (autograd passes None): the gradient from the image alone, and from
    the output alone, equal the tensor path's."""
    qkv, perm, plan = _problem((11, 13), 32, 2, seed=7)
    for pick in (0, 1):
        grads = []
        for impl in ('triton', 'tensor'):
            outs = clustered_attention(
                qkv, perm, plan, 2, hw_shape=(11, 13), impl=impl)
            grads.append(
                torch.autograd.grad(outs[pick].square().sum(), qkv)[0])
        torch.testing.assert_close(*grads, rtol=0, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_triton_low_precision(dtype):
    """float32 to float32 rounding; bfloat16 against the tensor path in
    float32 from the same rounded inputs, within a small multiple of the
    tensor path's own bfloat16 error."""
    qkv, perm, plan = _problem((14, 14), 64, 2, dtype=dtype, seed=3)
    ours = _run('triton', qkv, perm, plan, 2, (14, 14))
    ref = _run(
        'tensor', qkv, perm, plan, 2, (14, 14), upcast=dtype != torch.float32)
    assert all(a.dtype == dtype for a in ours)
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        own = _run('tensor', qkv, perm, plan, 2, (14, 14))
        assert_low_precision_close(ours, ref, own)


@pytest.mark.triton
def test_triton_op_lse_and_no_image():
    """The op's log-sum-exp equals the C++ op's (padding slots 0) or, by
    hand, ``logsumexp`` of a cluster's scores; without an image shape
    the image is empty and the gradient is the same as with a zero one."""
    qkv, perm, plan = _problem((11, 13), 32, 2, seed=5)
    args = (perm, plan.slot_valid, 2, plan.slot_size, 20, 0.25)
    out, image, lse = torch.ops.boat_mm_triton.clustered_attention(
        qkv, *args, [])
    assert image.numel() == 0 and lse.shape == perm.shape
    if cpu_kernel_available() and not CUDA:
        _, _, lse_cpp = torch.ops.boat_mm.clustered_attention(qkv, *args, [])
        torch.testing.assert_close(lse, lse_cpp, rtol=0, atol=1e-12)
    # Row 0, cluster 0: its real tokens and the first 20 of cluster 1.
    S = plan.slot_size
    n0 = int(plan.slot_valid[:S].sum())
    n1 = int(plan.slot_valid[S:2 * S].sum())
    keys = torch.cat([perm[0, :n0], perm[0, S:S + min(n1, 20)]])
    q = qkv[0, perm[0, :n0], :16]
    k = qkv[0, keys, 32:48]
    torch.testing.assert_close(
        lse[0, :n0], torch.logsumexp(0.25 * q @ k.T, -1), rtol=0, atol=1e-12)
    assert not lse[0, n0:S].any()
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    g1, = torch.autograd.grad((out * g).sum(), qkv)
    out2, image2, _ = torch.ops.boat_mm_triton.clustered_attention(
        qkv, *args, [11, 13])
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    g2, = torch.autograd.grad((out2 * g).sum() + 0 * image2.sum(), qkv)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.triton
def test_triton_clustering_through_the_public_function():
    """impl='triton' of the clustering runs the Triton kernel
    (``boat_mm/ops/triton/clustering.py``) through the boat_mm_triton op:
    the tensor ops' clusters in float64, padded N."""
    plan = build_cluster_plan(143, device=DEVICE)
    x = torch.randn(3, 143, 16, dtype=torch.float64, device=DEVICE)
    perm = balanced_hierarchical_clustering(x, plan, impl='triton')
    ref = balanced_hierarchical_clustering(x, plan, impl='tensor')
    assert torch.equal(perm, ref)


@pytest.mark.triton
def test_fsla_module_with_triton():
    """FSLA with ``clustering_impl='triton'`` and ``attention_impl=
    'triton'``: output and every parameter gradient equal the tensor
    path's in float64."""
    torch.manual_seed(0)
    ours = FeatureSpaceLocalAttention(
        32, 2, clustering_impl='triton', attention_impl='triton')
    ref = FeatureSpaceLocalAttention(
        32, 2, clustering_impl='tensor', attention_impl='tensor')
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 196, 32, dtype=torch.float64)
    results = []
    for module in (ours, ref):
        module.to(DEVICE, torch.float64)
        out = module(x.to(DEVICE), (14, 14))
        grads = torch.autograd.grad(out.square().sum(),
                                    list(module.parameters()))
        results.append((out, ) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.triton
def test_triton_backend_reaches_the_triton_op():
    """impl='triton' runs the boat_mm_triton op and its backward."""
    qkv, perm, plan = _problem((14, 14), 32, 2, dtype=torch.float32)
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Spy():
        out = clustered_attention(qkv, perm, plan, 2, impl='triton')
        out.sum().backward()
    assert 'boat_mm_triton.clustered_attention' in calls
    if not CUDA:  # (CUDA runs the backward in another thread)
        assert 'boat_mm_triton.clustered_attention_backward' in calls
    assert not any(c.startswith('boat_mm.') for c in calls)


def test_errors(monkeypatch):
    """The public function refuses unsupported choices, naming the problem
    and the fix (the backend table's own checks:
    tests/test_ops/test_backends.py)."""
    qkv, perm, plan = _problem((14, 14),
                               32,
                               2,
                               dtype=torch.float32,
                               device='cpu')
    with pytest.raises(ValueError, match="'triton'"):
        clustered_attention(qkv, perm, plan, 2, impl='gpu')
    with pytest.raises(ValueError, match='no attention dropout'):
        clustered_attention(
            qkv.to(DEVICE), perm.to(DEVICE), plan, 2, 0.1, 0.1, impl='triton')
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='set TRITON_INTERPRET=1'):
        clustered_attention(qkv, perm, plan, 2, impl='triton')


def test_compiled_kernels_refuse_cpu_tensors(monkeypatch):
    """Kernels compiled for the GPU (imported without TRITON_INTERPRET)
    refuse CPU tensors, naming the fix."""
    from boat_mm.ops.triton import clustered_attention as kernels
    qkv, perm, plan = _problem((14, 14),
                               32,
                               2,
                               dtype=torch.float32,
                               device='cpu')
    monkeypatch.setattr(kernels, 'interpreted', lambda: False)
    with pytest.raises(RuntimeError, match='set TRITON_INTERPRET=1'):
        torch.ops.boat_mm_triton.clustered_attention(qkv, perm,
                                                     plan.slot_valid, 2, 49,
                                                     20, 0.25, [])


# Compiles the kernels as the wrappers configure them for CUDA, for an H100
# (sm_90) with Triton's bundled ptxas: no GPU needed. The interpreter runs
# the kernels' Python and misses what only the compiler rejects; ptxas -v
# reports registers and spills.
_COMPILE_SCRIPT = """
import torch, triton
from triton.backends.compiler import GPUTarget
from _triton_compile import attention_source
from benchmarks._ptxas import compile_with_facts
from boat_mm.ops.triton import clustered_attention as k
assert not k.interpreted()
names = {torch.float32: 'fp32', torch.bfloat16: 'bf16',
         torch.float16: 'fp16'}
for dtype, d, tf32 in ((torch.bfloat16, 32, False),
                       (torch.bfloat16, 64, False),
                       (torch.float16, 32, False), (torch.float32, 32, False),
                       (torch.float32, 32, True)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for slots, kernel in ((49, 'fwd'), (49, 'bwd'), (66, 'fwd'), (66, 'bwd')):
        src, options = attention_source(kernel, dtype, d, slots)
        _, facts = compile_with_facts(src, GPUTarget('cuda', 90, 32),
                                      options)
        print(src.fn.__name__, 'tf32' if tf32 else names[dtype], d, slots,
              facts['registers'], facts['spills'])
"""

# Registers per thread that the sm_90 kernels may use (ptxas, Triton 3.8):
# at most 128 (two or more blocks of 8 warps per SM), except the float32
# forward (198 at 49 slots, 174 under TF32 at 66: one block of 8 warps
# per SM) and the tiles of 65-80 slots (a 64-row and a 16-row tile; 229
# and 235 for the bfloat16 backward, 221 and 227 at the 128-row tiles
# before).
_MAX_REGISTERS = {
    ('_forward_kernel', 'fp32', '32', '49'): 208,
    ('_forward_kernel', 'tf32', '32', '49'): 208,
    ('_forward_kernel', 'tf32', '32', '66'): 208,
    ('_forward_kernel', 'bf16', '64', '66'): 160,
    ('_backward_kernel', 'bf16', '32', '66'): 240,
    ('_backward_kernel', 'fp16', '32', '66'): 240,
    ('_backward_kernel', 'bf16', '64', '66'): 240,
}
# Bytes of spill stores allowed, with room: float32 at 66 slots (96 in
# the forward, 6216 in the backward with Triton 3.8; IEEE products on
# FMA) and the 16-warp float32 backward under TF32 (140 at 49 slots, as
# at the 64-row tile before; 7128 at 66).
_MAX_SPILLS = {
    ('_forward_kernel', 'fp32', '32', '66'): 1024,
    ('_backward_kernel', 'fp32', '32', '66'): 8192,
    ('_backward_kernel', 'tf32', '32', '49'): 512,
    ('_backward_kernel', 'tf32', '32', '66'): 8192,
}


@pytest.fixture(scope='module')
def sm90_cache(tmp_path_factory):
    """One Triton cache for this module's compile tests: the backward
    check's kernels for sm_90 are among those compiled for their
    registers, and its compiles apart are the wrappers' own."""
    return tmp_path_factory.mktemp('triton_cache')


@pytest.mark.triton
@pytest.mark.skipif(CUDA, reason='the cuda tests run the compiled kernels')
def test_kernels_compile_for_sm90(sm90_cache):
    """The kernels compile to H100 code as the wrappers configure them for
    CUDA (bfloat16 with 32- and 64-wide heads, float16, float32 with and
    without TF32; 49 and 66 slots), within the register bounds, and
    without spills but for the float32 backward and the float32 forward
    of 66 slots (docs/benchmarks.md), whose spills are bounded."""
    done = run_compile_script(_COMPILE_SCRIPT, sm90_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = [line.split() for line in done.stdout.splitlines()]
    assert len(facts) == 20, done.stdout
    for name, dtype, d, slots, regs, spills in facts:
        case = (name, dtype, d, slots)
        assert int(spills) <= _MAX_SPILLS.get(case, 0), (case, spills)
        if case not in _MAX_SPILLS:
            assert int(regs) <= _MAX_REGISTERS.get(case, 128), (case, regs)


# benchmarks/gpu_targets.py's stand-in driver: the wrappers' own
# compile-without-launch path (the forward's check that the backward fits
# a GPU's shared memory) run for GPUs that are not here.
_OFFLINE_SCRIPT = """
import importlib.util, sys, torch, triton
from triton.backends.compiler import GPUTarget
from _triton_compile import attention_source
from boat_mm.ops.triton import clustered_attention as k
spec = importlib.util.spec_from_file_location('gpu_targets', sys.argv[1])
targets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(targets)
index = 0
for cc, dtype, d, slots in ((90, torch.bfloat16, 32, 49),
                            (86, torch.bfloat16, 32, 66),
                            (80, torch.float32, 32, 66)):
    # Apart from the wrappers: the source written out, compiled directly
    # (the wrappers' compile below finds it in the cache when they
    # configure the kernel alike, and compiles their own otherwise).
    src, options = attention_source('bwd', dtype, d, slots)
    apart = triton.compile(src, target=GPUTarget('cuda', cc, 32),
                           options=options)
    direct = apart.metadata.shared
    verdicts = []
    for limit in (direct, direct - 1):  # just fits, one byte short
        index += 1
        with targets.offline_gpu(cc, limit, index):
            ours = k._compiled('bwd', dtype, d, slots, 20, 2)
            verdicts.append(
                k._kernel_too_large('bwd', dtype, d, slots, 20, 2, index))
    print(cc, ours.metadata.target.arch, direct, ours.metadata.shared,
          ours.hash == apart.hash, targets.TARGETS[cc][1], verdicts[0],
          verdicts[1])
# TF32 on gives another backward (float32, 49 slots): the check answers
# for the configuration of the moment, on the same GPU and sizes.
index += 1
need = {}
with targets.offline_gpu(90, 1 << 20, index):
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        need[tf32] = k._compiled('bwd', torch.float32, 32, 49, 20,
                                 2).metadata.shared
index += 1
verdicts = []
with targets.offline_gpu(90, min(need.values()), index):
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        verdicts.append(
            k._kernel_too_large('bwd', torch.float32, 32, 49, 20, 2, index))
print('tf32', need[False], need[True], verdicts[0], verdicts[1])
# The check before a call (too_large_for_gpu): the forward for inference,
# the forward and the backward for a training step; bfloat16 at 66 slots
# on sm_86 (its backward compiled above; the limits below are stand-ins,
# so any kernels whose forward needs less than their backward do, and
# float32's take four times as long to compile), GPUs with a byte less or
# just enough for either kernel (one device index, so that its kernels
# compile once; the verdicts and Triton's shared memory per device, both
# cached, cleared).
from triton.compiler.compiler import max_shared_mem
torch.backends.cuda.matmul.allow_tf32 = False
index += 1
with targets.offline_gpu(86, 1 << 20, index):
    need = [k._compiled(kernel, torch.bfloat16, 32, 66, 20,
                        2).metadata.shared for kernel in ('fwd', 'bwd')]
for limit in (need[0] - 1, need[0], need[1] - 1, need[1]):
    k._fit_check.cache_clear()
    max_shared_mem.cache_clear()
    with targets.offline_gpu(86, limit, index):
        errors = [k.too_large_for_gpu(torch.bfloat16, 32, 66, 20, 2, index,
                                      backward) for backward in (0, 1)]
    print('call', *need, limit, *(e.args[0] if e else '-' for e in errors),
          sep='|')
"""


@pytest.mark.triton
@pytest.mark.skipif(CUDA, reason='the cuda tests run the compiled kernels')
def test_backward_check_on_gpus_that_are_not_here(sm90_cache):
    """The forward's check that the backward of its sizes fits the GPU
    compiles the kernel the wrappers launch, for that GPU (here sm_90,
    sm_86 and sm_80, stood in for), and refuses exactly when it needs
    more shared memory than the GPU gives a block: the kernel is the one
    that the source written out apart compiles to (its hash; its bytes).
    The backward of clusters of 66 slots (800x1333 detection inputs)
    fits a 99 KB GPU (RTX 30/40) in bfloat16 and an A100 in float32.
    Switching TF32 on
    or off gets a fresh answer, not the one cached for the other. The
    check before a call (``too_large_for_gpu``, which ``impl='auto'``
    asks) names the forward where it does not fit, and the backward
    where only it does not and the call trains."""
    import os.path as osp
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    done = run_compile_script(
        _OFFLINE_SCRIPT.replace(
            'sys.argv[1]',
            repr(osp.join(root, 'benchmarks', 'gpu_targets.py'))), sm90_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    calls = [line.split('|')[1:] for line in lines[-4:]]
    del lines[-4:]
    tf32 = lines.pop().split(maxsplit=3)
    rows = [line.split(maxsplit=6) for line in lines]
    assert [r[0] for r in rows] == ['90', '86', '80'], done.stdout
    for cc, arch, direct, ours, same, gpu_limit, verdicts in rows:
        assert arch == cc
        assert int(ours) == int(direct) > 0
        # The very kernel: the same source, constexprs and options.
        assert same == 'True', cc
        assert int(direct) <= int(gpu_limit), (cc, direct, gpu_limit)
        fits, short = verdicts.split(maxsplit=1)
        assert fits == 'None'
        assert short == f'({direct}, {int(direct) - 1})'
    # The larger of the IEEE and TF32 backwards is refused, the other not.
    _, ieee, with_tf32, verdicts = tf32
    ieee, with_tf32 = int(ieee), int(with_tf32)
    if ieee == with_tf32:
        pytest.skip('this Triton compiles both to the same size')
    limit = min(ieee, with_tf32)
    refused = f'({max(ieee, with_tf32)}, {limit})'
    expected = ('None ' + refused if with_tf32 > ieee else refused + ' None')
    assert verdicts == expected, (verdicts, expected)
    # Before a call: inference needs the forward to fit, training both;
    # the error names the kernel, its bytes and the GPU's.
    fwd, bwd = (int(n) for n in calls[0][:2])
    assert fwd < bwd, calls
    for fwd_, bwd_, limit, inference, training in calls:
        limit = int(limit)
        for error, kernels in ((inference, [fwd]), (training, [fwd, bwd])):
            over = [n for n in kernels if n > limit]
            if not over:
                assert error == '-', (limit, error)
                continue
            name = 'forward' if over[0] == fwd else 'backward'
            assert error.startswith(f"FSLA's Triton attention {name} needs "
                                    f'{over[0]} bytes'), error
            assert f'this GPU has {limit}.' in error, error


@pytest.mark.triton
def test_gpu_model_records_launches_as_on_cuda(monkeypatch):
    """benchmarks/gpu_model.py records FSLA's launches with the choices
    the wrappers make for CUDA (not the interpreter's), without running
    them, and counts the products its sampled programs execute: the
    window attention's are exactly 2 (forward) and 5 (backward) 64x64xd
    products per program."""
    import sys
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the model adds to it
    model = load_script('benchmarks/gpu_model.py')
    from boat_mm.ops.triton import clustered_attention as kernels
    rec = model.record_shape(14, 32, 2, batch=1)
    names = [x.kernel for x in rec['fsla'].launches]
    attention = ['_forward_kernel', '_backward_kernel']
    # The clustering comes first: at 14x14 (4 clusters, nodes within
    # SORT_MAX slots) one launch of the subtree schedule does all levels.
    assert names == ['_subtree_kernel'] + attention
    cfg = kernels._launch_config(torch.bfloat16, 16, 49, 20,
                                 torch.device('cuda'))
    fwd = rec['fsla'].launches[names.index('_forward_kernel')]
    assert fwd.grid == (4, 2, 1)
    assert fwd.options['num_warps'] == cfg['fwd_warps']
    assert fwd.constexprs['UPCAST'] is False
    assert 'S' not in fwd.constexprs and 'S' not in fwd.attrs
    win_fwd, win_bwd = rec['window'].launches
    product = 2 * 64 * 64 * 16
    assert win_fwd.programs == 4 * 2
    assert win_fwd.flops == 2 * product * win_fwd.programs
    assert win_bwd.flops == 5 * product * win_bwd.programs
    # Every q, k and v row is read at least once: bytes >= useful bytes.
    assert fwd.bytes >= 196 * 3 * 32 * 2
    # Nothing is read back to the host (a GPU would wait), and no op runs
    # that CUDA tensors skip (the perm check is for CPU tensors).
    assert rec['fsla'].syncs == [] and rec['fsla'].ops == []


def test_fit_check_of_the_current_gpu(monkeypatch):
    """``too_large_for_gpu(..., device_index=None)`` checks the current
    CUDA device, as documented: Triton's device queries take an int (None
    made its check warn and answer nothing). Stood in for: compiled
    kernels, current device 3."""
    asked = []
    monkeypatch.setattr(tca, 'interpreted', lambda: False)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 3)
    monkeypatch.setattr(tca, '_kernel_too_large',
                        lambda kernel, *args: asked.append((kernel, args[-1])))
    assert tca.too_large_for_gpu(torch.float32, 32, 49, 20, 2, None,
                                 True) is None
    assert asked == [('fwd', 3), ('bwd', 3)]


def test_shared_memory_refusal_says_what_to_change():
    """Triton's refusal to launch a kernel larger than the GPU's shared
    memory becomes an error naming the sizes and the way out; other
    refusals stay Triton's."""
    cfg = tca._launch_config(torch.float64, 16, 81, 20, torch.device('cpu'))
    with pytest.raises(KernelResourcesError) as err:
        with tca._resources('bwd', torch.float64, cfg):
            raise OutOfResources(380928, 232448, 'shared memory')
    message = str(err.value)
    for part in ('backward', '380928', '232448', 'torch.float64',
                 'up to 128 slots', 'heads 16 wide',
                 "attention_impl='tensor'"):
        assert part in message, part
    # Autocast casts float32 only: the advice for float32 inputs alone.
    assert 'autocast' not in message
    with pytest.raises(KernelResourcesError) as err:
        with tca._resources('bwd', torch.float32, cfg):
            raise OutOfResources(380928, 232448, 'shared memory')
    assert 'Run under bfloat16 or float16 autocast' in str(err.value)
    with pytest.raises(OutOfResources):
        with tca._resources('fwd', torch.float32, cfg):
            raise OutOfResources(2048, 1024, 'threads')


def test_auto_runs_tensor_ops_where_the_kernels_do_not_fit(monkeypatch):
    """Where the Triton kernels are too large for the GPU, impl='auto'
    gives the tensor path's result (warning once) and impl='triton' the
    error. Stood in for here: 'auto' taking Triton on CPU tensors, and a
    forward that refuses."""
    qkv, perm, plan = _problem((11, 13), 32, 2)

    def refuse(*args):
        raise KernelResourcesError('too large for this GPU.')

    monkeypatch.setattr(tca, 'clustered_attention_forward', refuse)
    monkeypatch.setitem(
        _backends.BACKENDS, 'triton',
        _backends.Backend('triton', 'boat_mm_triton', lambda *args: None))
    assert _backends.select_backend('clustered_attention', 'auto',
                                    qkv).name == 'triton'
    _backends.warn_once.cache_clear()
    with pytest.warns(UserWarning, match='too large for this GPU. Running'):
        ours = _run('auto', qkv, perm, plan, 2, (11, 13))
    ref = _run('tensor', qkv, perm, plan, 2, (11, 13))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    with pytest.raises(KernelResourcesError, match='too large'):
        _run('triton', qkv, perm, plan, 2, (11, 13))


@pytest.mark.triton
@pytest.mark.skipif(
    CUDA, reason='stands in for a GPU; the cuda tests '
    'run the real one')
@pytest.mark.parametrize('compiled', [False, True])
def test_auto_decides_before_the_call_whether_the_kernels_fit(
        monkeypatch, compiled):
    """impl='auto' asks whether the Triton kernels fit the GPU before it
    calls the op, so that torch.compile(fullgraph=True) decides as eager
    mode does (in a compiled graph the op's inputs do not require grad,
    so the op cannot check the backward, and its error cannot be caught
    around it): a training step whose backward is too large runs on
    tensor ops, warning once; inference runs the kernels. Stood in for:
    'auto' taking Triton on CPU tensors, a GPU too small for the
    backward."""
    qkv, perm, plan = _problem((11, 13), 32, 2)
    asked = []

    def too_large(dtype, head_dims, slot_size, overlap, heads, index,
                  backward):
        # Untraceable, as the Triton compile it stands for: torch.compile
        # must call it, not trace it (a graph break fails fullgraph).
        torch._dynamo.graph_break()
        asked.append((dtype, head_dims, slot_size, overlap, heads, backward))
        return KernelResourcesError('too large.') if backward else None

    forward, launched = tca.clustered_attention_forward, []

    def counted(*args):
        launched.append(args[0].requires_grad)
        return forward(*args)

    monkeypatch.setattr(tca, 'too_large_for_gpu', too_large)
    monkeypatch.setattr(tca, 'clustered_attention_forward', counted)
    monkeypatch.setitem(
        _backends.BACKENDS, 'triton',
        _backends.Backend('triton', 'boat_mm_triton', lambda *args: None))
    _backends.warn_once.cache_clear()

    def attend(x):
        return clustered_attention(
            x, perm, plan, 2, hw_shape=(11, 13), impl='auto')

    if compiled:
        attend = torch.compile(attend, fullgraph=True, backend='aot_eager')
    with pytest.warns(UserWarning, match='too large. Running it on tensor'):
        ours = _run('auto', qkv, perm, plan, 2, (11, 13))
        # torch.compile's call: the training step traced, run twice.
        trained = [attend(qkv) for _ in range(2)]
    assert launched == []
    ref = _run('tensor', qkv, perm, plan, 2, (11, 13))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for out in trained:
        torch.testing.assert_close(out, ref[:2], rtol=0, atol=1e-12)
        grad, = torch.autograd.grad(out[0].sum(), qkv)
        assert grad.abs().sum() > 0
    with torch.no_grad():
        inferred = [attend(qkv.detach()), attend(qkv)]
    # The kernels, with no backward to follow (grad mode off, or an input
    # that does not require grad).
    assert len(launched) == 2
    for out in inferred:
        torch.testing.assert_close(out, ref[:2], rtol=0, atol=1e-12)
    d = (torch.float64, 16, plan.slot_size, plan.overlap, 2)
    assert set(asked) == {d + (True, ), d + (False, )}


@pytest.mark.triton
@pytest.mark.skipif(
    CUDA, reason='stands in for a GPU; the cuda tests '
    'run the real one')
@pytest.mark.parametrize('compiled', [False, True])
def test_batch_beyond_the_grid_rows(monkeypatch, compiled):
    """Batch x heads beyond the rows of a CUDA grid (65535; lowered to 3
    here): 'auto' runs the tensor ops, warning once, also compiled;
    'triton' says how many samples fit; at the limit the kernels run."""
    from boat_mm.ops import _library
    qkv, perm, plan = _problem((11, 13), 32, 2)  # batch 2 x 2 heads
    monkeypatch.setitem(
        _backends.BACKENDS, 'triton',
        _backends.Backend('triton', 'boat_mm_triton', lambda *args: None))
    forward, launched = tca.clustered_attention_forward, []
    monkeypatch.setattr(tca, 'clustered_attention_forward',
                        lambda *args: launched.append(1) or forward(*args))

    def attend(x):
        return clustered_attention(
            x, perm, plan, 2, hw_shape=(11, 13), impl='auto')

    if compiled:
        attend = torch.compile(attend, fullgraph=True, backend='aot_eager')
    ref = _run('tensor', qkv, perm, plan, 2, (11, 13))
    monkeypatch.setattr(_library, 'MAX_GRID_ROWS', 3)
    _backends.warn_once.cache_clear()
    with pytest.warns(
            UserWarning,
            match='at most 1 samples of 2 heads per '
            'call. Split the batch'):
        out = attend(qkv)
    assert launched == []
    torch.testing.assert_close(out, ref[:2], rtol=0, atol=0)
    with pytest.raises(KernelResourcesError, match='Got 2 samples'):
        _run('triton', qkv, perm, plan, 2, (11, 13))
    monkeypatch.setattr(_library, 'MAX_GRID_ROWS', 4)
    torch._dynamo.reset()
    launched.clear()
    out = attend(qkv)
    assert launched == [1]
    torch.testing.assert_close(out, ref[:2], rtol=0, atol=1e-12)


@pytest.mark.skipif(
    CUDA, reason='stands in for a GPU; the cuda tests '
    'run the real one')
def test_export_keeps_the_batch_unbounded(monkeypatch):
    """torch.export of the attention with the Triton kernels and a batch
    of any size: the check of the grid's rows does not bound it (the op
    refuses too many rows when it runs)."""
    qkv, perm, plan = _problem((11, 13), 32, 2)
    monkeypatch.setitem(
        _backends.BACKENDS, 'triton',
        _backends.Backend('triton', 'boat_mm_triton', lambda *args: None))

    class Attend(torch.nn.Module):

        def forward(self, x, perm):
            return clustered_attention(
                x, perm, plan, 2, hw_shape=(11, 13), impl='auto')

    # A bound far above the grid's rows (torch 2.4 needs one for 2*batch).
    batch = torch.export.Dim('batch', min=1, max=2**40)
    program = torch.export.export(
        Attend(), (qkv.detach(), perm),
        dynamic_shapes=({
            0: batch
        }, {
            0: 2 * batch
        }))
    ops = [str(n.target) for n in program.graph.nodes]
    assert any('boat_mm_triton.clustered_attention' in op for op in ops)
    bounds = [r.upper for r in program.range_constraints.values()]
    assert all(upper > 2**31 for upper in bounds), bounds


# ---------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these).
# ---------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_auto_takes_tensor_ops_where_the_backward_does_not_fit():
    """float32 heads 64 wide in clusters of 81 (128-row tiles; group size
    64): the backward needs 270 KB of shared memory (sm_90 compile), more
    than an H100 has. 'auto' trains on tensor ops with a warning,
    'triton' says what to change."""
    qkv, perm, plan = _problem((9, 18),
                               128,
                               2,
                               dtype=torch.float32,
                               group_size=64,
                               device='cuda')
    assert plan.slot_size == 81
    too_large = tca._kernel_too_large('bwd', torch.float32, 64, 81, 20, 2,
                                      qkv.device.index)
    assert too_large is not None and too_large[0] > too_large[1]
    with pytest.raises(KernelResourcesError, match=str(too_large[0])):
        _run('triton', qkv, perm, plan, 2, (9, 18))
    _backends.warn_once.cache_clear()
    with pytest.warns(UserWarning, match='Running it on tensor ops'):
        ours = _run('auto', qkv, perm, plan, 2, (9, 18))
    ref = _run('tensor', qkv, perm, plan, 2, (9, 18))
    # The same tensor ops; SDPA's backward on CUDA may add in another order.
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Compiled, 'auto' decides before the op as well.
    compiled = torch.compile(
        lambda x: clustered_attention(
            x, perm, plan, 2, hw_shape=(9, 18), impl='auto'),
        fullgraph=True,
        backend='aot_eager')
    out, image = compiled(qkv)
    torch.testing.assert_close((out, image), ref[:2], rtol=1e-5, atol=1e-6)
    out.sum().backward()


@pytest.mark.cuda
# The stages of a 224 image and of a 512x512 crop, a padded map, and a
# stage of an 800x1333 detection input (clusters of 66: the overflow tile).
@pytest.mark.parametrize('hw,dims,heads', [((56, 56), 64, 2),
                                           ((28, 28), 128, 4),
                                           ((128, 128), 64, 2),
                                           ((30, 41), 256, 8),
                                           ((50, 84), 256, 8)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cuda_triton_equals_tensor_path(hw, dims, heads, dtype):
    qkv, perm, plan = _problem(
        hw, dims, heads, dtype=dtype, batch=4, device='cuda')
    ours = _run('triton', qkv, perm, plan, heads, hw)
    ref = _run(
        'tensor', qkv, perm, plan, heads, hw, upcast=dtype != torch.float32)
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    else:
        own = _run('tensor', qkv, perm, plan, heads, hw)
        assert_low_precision_close(ours, ref, own)
    # Deterministic: every gradient row is written once.
    again = _run('triton', qkv, perm, plan, heads, hw)
    assert torch.equal(again[2], ours[2])


@pytest.mark.cuda
@pytest.mark.parametrize('hw', [(23, 29), (25, 42)])
def test_cuda_float64(hw):
    qkv, perm, plan = _problem(hw, 64, 2, device='cuda')
    ours = _run('triton', qkv, perm, plan, 2, hw)
    ref = _run('tensor', qkv, perm, plan, 2, hw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _train_step(model, x):
    out = model(x)
    out = out if torch.is_tensor(out) else sum(o.float().mean() for o in out)
    out.float().mean().backward()


@pytest.mark.cuda
def test_cuda_no_host_sync_fsla_and_backbone():
    """A training step of FSLA, BOAT-Swin and BOAT-CSWin on CUDA never
    waits for the device (torch.cuda.set_sync_debug_mode('error'))."""
    from boat_mm.models import BOATCSWin, BOATSwin
    fsla = FeatureSpaceLocalAttention(64, 2).cuda()
    x = torch.randn(2, 56 * 56, 64, device='cuda')
    backbones = [
        BOATSwin(arch='tiny', out_indices=(3, )).cuda(),
        BOATCSWin(arch='tiny', out_indices=(3, )).cuda()
    ]
    img = torch.randn(1, 3, 224, 224, device='cuda')
    for step in range(2):  # the first one builds plans and compiles
        if step:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode('error')
        try:
            with torch.autocast('cuda', torch.bfloat16):
                fsla(x, (56, 56)).float().mean().backward()
                for backbone in backbones:
                    _train_step(backbone, img)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize('mode', [None, 'reduce-overhead'])
def test_cuda_compile_backbone(mode):
    """torch.compile(fullgraph=True) of BOAT-Swin's training step, and
    CUDA graphs (mode='reduce-overhead'), give the eager result."""
    from boat_mm.models import BOATSwin
    torch.manual_seed(0)
    model = BOATSwin(arch='tiny', out_indices=(3, ), drop_path_rate=0.).cuda()
    img = torch.randn(1, 3, 224, 224, device='cuda')

    def step(x):
        return model(x)[0].float().square().mean()

    compiled = torch.compile(step, fullgraph=True, mode=mode, dynamic=False)
    ref = step(img)
    for _ in range(3):  # reduce-overhead records the graph on a later call
        loss = compiled(img)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()
               if p.requires_grad)
