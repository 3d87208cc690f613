# Copyright (c) boat-mm contributors. All rights reserved.
import logging
import os
import os.path as osp
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's
# interpreter. triton.jit reads this variable when a kernel module is
# imported (boat_mm imports them on their first use), so it is set before
# any test runs. Not on machines with CUDA: there the kernels are tested
# compiled, and the interpreter would also take over the Triton kernels
# that torch.compile generates.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# One thread, in this process and in the tools the tests run as
# subprocesses (they inherit the variable), unless the caller chose a
# count: the tests' tensors are tiny, so OpenMP threads mostly wait for
# each other, and on CI's two cores, shared with the subprocesses and
# other jobs, a waiting thread spins (test_random_baseline_is_chance took
# 25 s with two threads, 0.3 s with one). The tests of the kernels'
# independence of the thread count set 1, 2 and 3 threads themselves.
if 'OMP_NUM_THREADS' not in os.environ:
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# The `triton` marker's skip and its check (tests/triton_launches.py), and
# pytester, whose test of that check runs pytest on a toy test file.
pytest_plugins = ['triton_launches', 'pytester']


def _look_up_upstream_bases_once() -> None:
    """MMEngine resolves every ``mmseg::``/``mmdet::``/``mmpretrain::``
    ``_base_`` by asking whether the package is installed (reloading
    ``pkg_resources``, 0.04 s), then by reading all the metafiles of its
    model index (about 80 YAML files, 0.2 s) before it falls back to the
    ``_base_`` folder when the file is not listed: about 0.8 s per
    ``Config.fromfile`` of one of our configs, 25 s of test_configs.py
    alone. Nothing is installed or uninstalled, and no metafile written,
    while the tests run, so each package's answer and each metafile's
    parse are taken once per session (a metafile again if it changes):
    the lookups answer as before, and their callers only read what they
    return. A test that fakes a missing package patches
    ``is_installed`` itself; tools run as subprocesses look up as users'
    runs do."""
    import mmengine.config.config as cfg_module
    import mmengine.config.utils as cfg_utils
    parse, installed = cfg_utils.load, cfg_module.is_installed
    parsed, answers = {}, {}

    def load(file, *args, **kwargs):
        if args or kwargs or not isinstance(file, str):
            return parse(file, *args, **kwargs)
        key = (file, os.stat(file).st_mtime_ns)
        if key not in parsed:
            parsed[key] = parse(file)
        return parsed[key]

    def is_installed(package: str) -> bool:
        if package not in answers:
            answers[package] = installed(package)
        return answers[package]

    cfg_utils.load = load
    cfg_module.is_installed = is_installed


_look_up_upstream_bases_once()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` need a CUDA GPU: skipped without one. (The
    ``triton`` marker: triton_launches.py.)"""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)


def _revive_mmengine_log_streams() -> None:
    logger_mod = sys.modules.get('mmengine.logging.logger')
    if logger_mod is None:
        return
    for logger in list(logger_mod.MMLogger._instance_dict.values()):
        for handler in logger.handlers:
            if (type(handler) is logging.StreamHandler
                    and getattr(handler.stream, 'closed', False)):
                # Not setStream(): it flushes the closed stream.
                handler.stream = sys.__stdout__


@pytest.fixture(autouse=True)
def _mmengine_loggers_keep_a_live_stream():
    """MMEngine's loggers keep the ``sys.stdout`` of the moment they were
    made; made inside a test that captures output, that is pytest's capture
    stream, closed after the test, and every later log line becomes a
    "Logging error" traceback on stderr (which tests of the tools' one-line
    errors read). Point such handlers back at the real stdout."""
    _revive_mmengine_log_streams()
    yield
    _revive_mmengine_log_streams()


@pytest.fixture(scope='session')
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope='session')
def ade_root(tmp_path_factory) -> str:
    """A tiny generated ADE20K-like dataset shared by the tests."""
    from boat_mm.datasets import generate_ade20k_like
    out = tmp_path_factory.mktemp('ade')
    return generate_ade20k_like(
        str(out), num_train=8, num_val=4, img_size=64, seed=0, progress=False)


@pytest.fixture(scope='session')
def imagenet_root(tmp_path_factory) -> str:
    """A tiny generated ImageNet-like dataset shared by the tests."""
    from boat_mm.datasets import generate_imagenet_like
    out = tmp_path_factory.mktemp('imagenet')
    generate_imagenet_like(
        str(out), num_train=3, num_val=2, img_size=32, seed=0, progress=False)
    return str(out)
