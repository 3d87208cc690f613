# Copyright (c) boat-mm contributors. All rights reserved.
"""tests/conftest.py skips the tests that run FSLA's Triton kernels
exactly where tools/check_triton_range.sh found Triton's interpreter
unable to run them (and nowhere on a GPU, where they run compiled)."""
import importlib.metadata
from types import SimpleNamespace

import conftest
import pytest
import torch


@pytest.mark.parametrize('triton, numpy, runs', [
    ('3.8.0', '2.4.6', True),
    ('3.7.1', '2.3.0', True),
    ('3.10.0+git1a2b', '2.4.0', True),
    ('3.6.0', '2.2.6', True),
    ('3.5.1', '1.26.4', True),
    ('3.6.0', '2.3.0', False),
    ('3.5.0', '2.2.6', False),
    ('3.4.0', '2.2.6', False),
    ('3.0.0', '1.26.4', False),
])
def test_kernel_tests_skipped_where_the_interpreter_fails(
        monkeypatch, triton, numpy, runs):
    versions = dict(triton=triton, numpy=numpy)
    monkeypatch.setattr(importlib.metadata, 'version', versions.__getitem__)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.delenv('BOAT_MM_ANY_TRITON', raising=False)
    reason = conftest._interpreter_cannot_run_kernels()
    if runs:
        assert reason is None
    else:
        for part in (f'Triton {triton}', f'numpy {numpy}',
                     'tools/check_triton_range.sh'):
            assert part in reason, part
    # The range script runs them anyway; a GPU runs them compiled.
    monkeypatch.setenv('BOAT_MM_ANY_TRITON', '1')
    assert conftest._interpreter_cannot_run_kernels() is None
    monkeypatch.delenv('BOAT_MM_ANY_TRITON')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert conftest._interpreter_cannot_run_kernels() is None


def test_the_kernel_tests_are_selected():
    """The Triton test files and the ``impl='triton...'`` cases, nothing
    else (a test that merely names Triton runs)."""

    def item(path, **params):
        callspec = SimpleNamespace(params=params) if params else None
        return SimpleNamespace(fspath=path, callspec=callspec)

    chosen = [
        item('tests/test_ops/test_triton_fsla.py'),
        item('tests/test_ops/test_triton_attention.py', dtype='bf16'),
        item('tests/test_ops/test_tie_breaking.py', impl='triton'),
        item(
            'tests/test_ops/test_uninitialized_memory.py',
            impl='triton-phased'),
    ]
    kept = [
        item('tests/test_ops/test_tie_breaking.py', impl='cpp'),
        item('tests/test_ops/test_library.py'),
        item('tests/test_docs/test_docstrings.py', name='triton.py'),
        item('tests/test_ops/test_cuda_branches.py', impl=None),
    ]
    assert all(conftest._runs_triton_kernels(x) for x in chosen)
    assert not any(conftest._runs_triton_kernels(x) for x in kept)
