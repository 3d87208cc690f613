# Copyright (c) boat-mm contributors. All rights reserved.
"""boat_mm/ops/_library.py: the ops' registrations. Fake (shape) kernels
agree with the real CPU kernels, kernels are registered where the module
says, and a missing Triton says what to do."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from boat_mm.ops import _library, build_cluster_plan

HW, HEADS, DIMS = (10, 12), 2, 16


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _inputs():
    torch.manual_seed(0)
    plan = build_cluster_plan(HW[0] * HW[1], 32, 8)
    qkv = torch.randn(1, plan.num_tokens, 3 * DIMS)
    q = qkv[..., :DIMS].reshape(1, -1, HEADS, DIMS // HEADS).transpose(1, 2)
    x = q.reshape(HEADS, plan.num_tokens, DIMS // HEADS).contiguous()
    return plan, qkv, x


def _ops(plan, qkv, x, namespace='boat_mm'):
    clustering = _library.op_overload('balanced_clustering', namespace)
    attention = _library.op_overload('clustered_attention', namespace)
    perm = clustering(x, plan.num_levels, plan.slot_size, 2, 100.)
    outs = attention(qkv, perm, plan.slot_valid, HEADS, plan.slot_size,
                     plan.overlap, 0.5, list(HW))
    return (perm, *outs)


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.stride()


@pytest.mark.skipif(
    not _library.CPU_KERNELS_LOADED, reason='boat_mm._C is not built')
def test_fake_kernels_match_the_cpu_kernels():
    plan, qkv, x = _inputs()
    assert plan.num_clusters > 1
    real = _ops(plan, qkv, x)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = _ops(plan, mode.from_tensor(qkv), mode.from_tensor(x))
    assert [_meta(t) for t in fake] == [_meta(t) for t in real]
    # The value image of the C++ op is (B, C, H, W), contiguous.
    assert real[2].shape == (1, DIMS, *HW) and real[2].is_contiguous()
    assert real[0].shape == (HEADS, plan.slot_size << plan.num_levels)


def test_fake_attention_image_layout_per_namespace():
    """The Triton namespace's value image is channels-last, on any device;
    without ``hw_shape`` there is no image."""
    plan, qkv, x = _inputs()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        qkv_f, x_f = mode.from_tensor(qkv), mode.from_tensor(x)
        _, out, image, lse = _ops(plan, qkv_f, x_f, 'boat_mm_triton')
        perm = _library.op_overload('balanced_clustering',
                                    'boat_mm')(x_f, plan.num_levels,
                                               plan.slot_size, 2, 100.)
        _, empty, _ = _library.op_overload('clustered_attention',
                                           'boat_mm')(qkv_f, perm,
                                                      plan.slot_valid, HEADS,
                                                      plan.slot_size,
                                                      plan.overlap, 0.5, [])
    assert out.shape == (1, plan.num_tokens, DIMS)
    assert image.shape == (1, DIMS, *HW)
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert lse.shape == perm.shape and lse.dtype == qkv.dtype
    assert empty.numel() == 0


def test_kernels_are_registered_where_documented():
    for name in ('balanced_clustering', 'clustered_attention',
                 'clustered_attention_backward'):
        # Triton on CUDA in both namespaces, on the CPU in boat_mm_triton.
        assert _has_kernel(f'boat_mm_triton::{name}', 'CPU')
        assert _has_kernel(f'boat_mm_triton::{name}', 'CUDA')
        assert _has_kernel(f'boat_mm::{name}', 'CUDA')
        # boat_mm's CPU kernels come from boat_mm._C only.
        assert _has_kernel(f'boat_mm::{name}', 'CPU') == \
            _library.CPU_KERNELS_LOADED
    # The clustering's tensor ops, for tracers, in boat_mm only.
    assert _has_kernel('boat_mm::balanced_clustering',
                       'CompositeExplicitAutograd')
    assert not _has_kernel('boat_mm_triton::balanced_clustering',
                           'CompositeExplicitAutograd')
    assert _has_kernel('boat_mm::clustered_attention', 'Autograd')


def test_missing_triton_names_the_fix(monkeypatch):

    def missing(module: str):

        def import_module(name):
            raise ModuleNotFoundError(
                f'No module named {module!r}', name=module)

        return import_module

    monkeypatch.setattr(_library.importlib, 'import_module', missing('triton'))
    kernel = _library._lazy_triton('clustered_attention')
    assert kernel.__name__ == 'clustered_attention_triton'
    with pytest.raises(RuntimeError, match="install triton.*impl='tensor'"):
        kernel()
    # Other import errors are not disguised.
    monkeypatch.setattr(_library.importlib, 'import_module', missing('numpy'))
    with pytest.raises(ModuleNotFoundError):
        kernel()


# ---------------------------------------------------------------------------
# A boat_mm._C older than its sources is not loaded.
# ---------------------------------------------------------------------------

_LOAD_SCRIPT = '''
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import boat_mm
    from boat_mm.ops import cpu_kernel_available
msgs = [str(w.message) for w in caught if 'boat_mm._C' in str(w.message)]
print(boat_mm.__file__, cpu_kernel_available(), msgs)
'''


def test_sources_digest_follows_names_and_bytes(tmp_path):
    from boat_mm.ops._sources import sources_digest
    (tmp_path / 'a.cpp').write_bytes(b'int a;\n')
    (tmp_path / 'b.h').write_bytes(b'int b;\n')
    digest = sources_digest(str(tmp_path))
    assert len(digest) == 64 and digest == sources_digest(str(tmp_path))
    (tmp_path / 'b.h').write_bytes(b'int b; \n')
    assert sources_digest(str(tmp_path)) != digest
    (tmp_path / 'b.h').write_bytes(b'int b;\n')
    assert sources_digest(str(tmp_path)) == digest
    (tmp_path / 'b.h').rename(tmp_path / 'c.h')
    assert sources_digest(str(tmp_path)) != digest


@pytest.mark.skipif(
    not _library.CPU_KERNELS_LOADED, reason='boat_mm._C is not built')
def test_stale_cpu_kernels_are_not_loaded(tmp_path):
    """A copy of the package with its ``_C`` loads it; after one byte of
    its C++ sources changes (a pull without a rebuild), it does not, and
    says how to rebuild, and FSLA runs on tensor ops."""
    import os
    import os.path as osp
    import shutil
    import subprocess
    import sys

    import boat_mm
    shutil.copytree(
        osp.dirname(boat_mm.__file__),
        tmp_path / 'boat_mm',
        ignore=shutil.ignore_patterns('__pycache__'))

    def load():
        env = dict(os.environ, PYTHONPATH=str(tmp_path))
        out = subprocess.run([sys.executable, '-c', _LOAD_SCRIPT],
                             cwd=str(tmp_path),
                             env=env,
                             capture_output=True,
                             text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        path, loaded, msgs = out.stdout.strip().split(' ', 2)
        assert path.startswith(str(tmp_path))  # the copy was imported
        return loaded == 'True', msgs

    assert load() == (True, '[]')
    with open(tmp_path / 'boat_mm' / 'ops' / 'csrc' / 'simd.h', 'a') as f:
        f.write('// changed after the build\n')
    loaded, msgs = load()
    assert not loaded
    assert 'other C++ sources' in msgs
    assert 'pip install --no-build-isolation -e .' in msgs
