# Copyright (c) boat-mm contributors. All rights reserved.
"""The ``triton`` marker, a pytest plugin (tests/conftest.py loads it).

A test that runs or compiles a Triton kernel carries the marker. Under a
Triton older than ``boat_mm.version.TRITON_MIN_TESTED``, whose interpreter
cannot run FSLA's kernels (torch 2.4's Triton 3.0: tools/check_min_torch.sh),
the marked tests skip, so that the failures left there are real;
``BOAT_MM_TRITON_TESTS=all`` runs them anyway (tools/check_triton_range.sh
does, to see what older releases give).

Every kernel launch in the test process (``run`` of Triton's JIT and
interpreted functions, not its ``warmup`` compiles) is counted from the
setup of each test, module fixtures included, and a test that launches one
without the marker fails: the marker stays complete without a list kept by
hand. A module fixture that launches is charged to the first test that sets
it up, so mark every test that uses it. Not seen, so marked by hand:
compiles in a subprocess or through ``warmup``, tests that replace the
launch themselves (the GPU model's recorder), and launches in the teardown
of a fixture wider than a test (charged to the next test when its setup
tears down a parametrized one; none of the suite's fixtures launches).
"""
import os
from typing import List, Optional

import pytest


def triton_below_tested() -> Optional[str]:
    """Why the installed Triton cannot be trusted to run FSLA's kernels
    (older than ``TRITON_MIN_TESTED``), or None (a tested one, or none:
    the tests that need one skip by themselves)."""
    try:
        import triton
    except ImportError:
        return None
    from mmengine.utils import digit_version

    from boat_mm.version import TRITON_MIN_TESTED
    if digit_version(triton.__version__) >= digit_version(TRITON_MIN_TESTED):
        return None
    return (f'Triton {triton.__version__} is older than the tested '
            f'{TRITON_MIN_TESTED} (boat_mm/version.py)')


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the tests marked ``triton`` under a Triton below the tested
    (unless ``BOAT_MM_TRITON_TESTS=all``)."""
    reason = triton_below_tested()
    if not reason or os.environ.get('BOAT_MM_TRITON_TESTS') == 'all':
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker('triton') is not None:
            item.add_marker(skip)


def _count_triton_launches() -> List[str]:
    """Record every Triton kernel launch of this process (interpreted or
    compiled), by kernel name, from now on.

    Returns:
        list: The names, appended as kernels launch.
    """
    launches: List[str] = []
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return launches
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        # Triton 3.0's interpreter launches otherwise; its kernel tests
        # skip, and CI's Triton enforces the marker.
        run = getattr(cls, 'run', None)
        if run is None:
            continue

        def counted(self, *args, _run=run, **kwargs):
            if not kwargs.get('warmup', False):
                launches.append(getattr(self, '__name__', repr(self)))
            return _run(self, *args, **kwargs)

        cls.run = counted
    return launches


_TRITON_LAUNCHES = _count_triton_launches()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Count from here: before the test's fixtures, module ones too."""
    item.stash[_LAUNCHES_BEFORE] = len(_TRITON_LAUNCHES)


_LAUNCHES_BEFORE = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def _triton_launches_are_marked(request):
    """A test that launches a Triton kernel must carry the ``triton``
    marker (``@pytest.mark.triton``, or ``marks=`` on its parameters),
    which skips it where Triton is too old: fail it otherwise, so that
    the marker stays complete."""
    before = request.node.stash.get(_LAUNCHES_BEFORE, len(_TRITON_LAUNCHES))
    yield
    launched = sorted(set(_TRITON_LAUNCHES[before:]))
    if launched and request.node.get_closest_marker('triton') is None:
        pytest.fail(
            f'{request.node.nodeid} launched Triton kernels ({launched}) '
            f'without the `triton` marker: add @pytest.mark.triton (or '
            f'pytest.param(..., marks=pytest.mark.triton) to the '
            f'parameters that launch them)',
            pytrace=False)
