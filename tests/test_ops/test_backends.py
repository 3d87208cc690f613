# Copyright (c) boat-mm contributors. All rights reserved.
"""boat_mm/ops/_backends.py: which backend runs an FSLA op, decided from
what the backend table reads of the input (device, dtype), the dropout
and the tracer, without running a kernel (CUDA cases need no GPU)."""
import types

import pytest
import torch

from boat_mm.ops import _backends, cpu_kernel_available
from boat_mm.ops._library import CPU_KERNELS_LOADED

ATTN, CLUS = 'clustered_attention', 'balanced_clustering'


def _like(device: str, dtype=torch.float32):
    """What the backend table reads of a tensor: its device and dtype (so
    that CUDA cases can be checked without a GPU)."""
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_auto_rules(monkeypatch):
    """'auto': Triton on CUDA (float32/16-bit, no dropout), C++ on the CPU
    when built, else tensor ops; under torch.jit tracing the clustering is
    always an op (its tensor ops, which the tracer cannot record, as the
    op's default kernel); never the interpreter."""
    select = _backends.select_backend
    attn, clus = 'clustered_attention', 'balanced_clustering'
    monkeypatch.setattr(_backends, '_HAS_TRITON', True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert select(attn, 'auto', _like('cuda', dtype)).name == 'triton'
        assert select(clus, 'auto', _like('cuda', dtype)).name == 'triton'
    assert select(attn, 'auto', _like('cuda', torch.float64)).name == \
        'tensor'
    assert select(attn, 'auto', _like('cuda'), 0.1).name == 'tensor'
    assert select(attn, 'auto', _like('mps')).name == 'tensor'
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    cpu = 'cpp' if cpu_kernel_available() else 'tensor'
    assert select(attn, 'auto', _like('cpu')).name == cpu
    assert select(clus, 'auto', _like('cpu')).name == cpu
    assert select(attn, 'auto', _like('cpu', torch.bfloat16)).name == \
        'tensor'
    monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', False)
    assert select(clus, 'auto', _like('cpu')).name == 'tensor'
    monkeypatch.setattr(_backends, '_HAS_TRITON', False)
    assert select(attn, 'auto', _like('cuda')).name == 'tensor'
    assert select(clus, 'auto', _like('cuda')).name == 'tensor'
    monkeypatch.setattr(_backends, '_HAS_TRITON', True)
    monkeypatch.setattr(torch.jit, 'is_tracing', lambda: True)
    assert select(attn, 'auto', _like('cuda')).name == 'triton'
    assert select(attn, 'auto', _like('cpu')).name == 'tensor'
    traced = select(clus, 'auto', _like('cpu'))
    assert traced.name == 'tensor' and traced.namespace == 'boat_mm'
    assert traced.op(clus) is torch.ops.boat_mm.balanced_clustering.default
    # Explicit choices are kept.
    assert select(attn, 'triton', _like('cuda', torch.float64)).name == \
        'triton'
    assert select(attn, 'tensor', _like('cuda')).name == 'tensor'


def test_explicit_choice_errors(monkeypatch):
    """Each unsupported explicit choice names the problem and the fix."""
    select = _backends.select_backend
    monkeypatch.setattr(_backends, '_HAS_TRITON', True)
    for impl in ('gpu', 'Auto', ''):
        with pytest.raises(ValueError, match="must be 'auto', 'cpp'"):
            select(ATTN, impl, _like('cpu'))
    with pytest.raises(ValueError, match="clustering_impl must be"):
        _backends.check_impl('cuda', 'clustering_impl')
    with pytest.raises(ValueError, match='supports float32, bfloat16'):
        select(ATTN, 'triton', _like('cuda', torch.int32))
    with pytest.raises(ValueError, match='set TRITON_INTERPRET=1'):
        select(ATTN, 'triton', _like('mps'))
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='set TRITON_INTERPRET=1'):
        select(CLUS, 'triton', _like('cpu'))
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert select(CLUS, 'triton', _like('cpu')).name == 'triton'
    # The C++ kernels' input errors, built or not here.
    monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', True)
    with pytest.raises(ValueError, match="runs on the CPU.*'triton'"):
        select(CLUS, 'cpp', _like('cuda'))
    with pytest.raises(ValueError, match='without attention dropout'):
        select(ATTN, 'cpp', _like('cpu'), 0.1)
    with pytest.raises(ValueError, match='supports float32/float64 CPU'):
        select(ATTN, 'cpp', _like('cpu', torch.float16))
    monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', False)
    with pytest.raises(RuntimeError, match='BOAT_MM_WITH_OPS'):
        select(CLUS, 'cpp', _like('cpu'))
    monkeypatch.setattr(_backends, '_HAS_TRITON', False)
    with pytest.raises(RuntimeError, match='needs the triton package'):
        select(ATTN, 'triton', _like('cuda'))


def test_backend_ops_and_kernel_flag():
    """Each backend names the op of its namespace; the flag the policy
    reads is the library's."""
    table = _backends.BACKENDS
    assert table['tensor'].op(ATTN) is None
    assert table['cpp'].op(ATTN) is \
        torch.ops.boat_mm.clustered_attention.default
    assert table['triton'].op(CLUS) is \
        torch.ops.boat_mm_triton.balanced_clustering.default
    assert _backends.cpu_kernel_loaded() is CPU_KERNELS_LOADED
    assert set(_backends.AUTO_ORDER) == set(table) == \
        set(_backends.IMPLS) - {'auto'}


def test_onnx_export_takes_tensor_ops(monkeypatch):
    """Under ONNX export 'auto' runs tensor ops for both ops, even where a
    kernel exists and the jit tracer is active."""
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    monkeypatch.setattr(torch.jit, 'is_tracing', lambda: True)
    monkeypatch.setattr(_backends, '_HAS_TRITON', True)
    for op in (ATTN, CLUS):
        for device in ('cpu', 'cuda'):
            backend = _backends.select_backend(op, 'auto', _like(device))
            assert backend.name == 'tensor' and backend.namespace is None
