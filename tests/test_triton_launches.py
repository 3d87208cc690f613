# Copyright (c) boat-mm contributors. All rights reserved.
"""The ``triton`` marker's plugin (tests/triton_launches.py), run by pytest
on a toy test file in a fresh process."""
import os
import os.path as osp

import pytest

pytest.importorskip('triton')

TESTS = osp.dirname(osp.abspath(__file__))

TOY = '''
import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _copy(x_ptr, y_ptr):
    tl.store(y_ptr, tl.load(x_ptr))


def _launch():
    x, y = torch.ones(1), torch.zeros(1)
    _copy[(1, )](x, y)
    assert y.item() == 1


@pytest.fixture(scope='module')
def launched():
    _launch()


def test_unmarked_module_fixture(launched):
    pass


def test_unmarked():
    _launch()


@pytest.mark.triton
def test_marked():
    _launch()


@pytest.mark.parametrize('n', [pytest.param(1, marks=pytest.mark.triton), 2])
def test_param(n):
    if n == 1:
        _launch()


def test_no_kernel():
    pass
'''


def _run(pytester, monkeypatch, old_triton: bool):
    pytester.makepyfile(test_toy=TOY)
    pytester.makeini('[pytest]\nmarkers =\n    triton: a Triton kernel\n')
    if old_triton:
        pytester.makeconftest('import triton\ntriton.__version__ = "3.0.0"\n')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setenv(
        'PYTHONPATH',
        os.pathsep.join([TESTS, osp.dirname(TESTS)] +
                        [p for p in [os.environ.get('PYTHONPATH')] if p]))
    return pytester.runpytest_subprocess('-p', 'triton_launches', '-rA')


def test_a_launch_without_the_marker_fails(pytester, monkeypatch):
    """The unmarked test that launches a kernel fails (at teardown, naming
    the kernel and the fix); the marked ones and a parameter marked alone
    pass, as does a test without a kernel."""
    result = _run(pytester, monkeypatch, old_triton=False)
    result.assert_outcomes(passed=6, errors=2)
    for name in ('test_unmarked', 'test_unmarked_module_fixture'):
        assert (f"test_toy.py::{name} launched Triton kernels (['_copy']) "
                f'without the `triton` marker: add @pytest.mark.triton'
                in result.stdout.str())


def test_below_the_tested_triton_the_marked_tests_skip(pytester, monkeypatch):
    """Under a Triton older than TRITON_MIN_TESTED the marked tests and
    parameters skip, saying why; the others run (an unmarked launch still
    fails)."""
    from boat_mm.version import TRITON_MIN_TESTED
    result = _run(pytester, monkeypatch, old_triton=True)
    result.assert_outcomes(passed=4, skipped=2, errors=2)
    out = result.stdout.str()
    assert out.count(f'Triton 3.0.0 is older than the tested '
                     f'{TRITON_MIN_TESTED} (boat_mm/version.py)') == 2, out
    # tools/check_triton_range.sh runs them anyway.
    monkeypatch.setenv('BOAT_MM_TRITON_TESTS', 'all')
    result = pytester.runpytest_subprocess('-p', 'triton_launches')
    result.assert_outcomes(passed=6, errors=2)


def test_the_plugin_is_loaded_here(request):
    """tests/conftest.py loads it for the whole suite."""
    assert request.config.pluginmanager.has_plugin('triton_launches')
