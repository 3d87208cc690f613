# Copyright (c) boat-mm contributors. All rights reserved.
"""The tests of tools/ only: the tools' own shared code (tools/boat_tools,
not installed: their CLI manner and the loader of the public BOAT code) is
importable here, as the tools reach it. Library code is imported from
``boat_mm`` everywhere."""
import os.path as osp
import sys
from types import ModuleType

import pytest
from repo_scripts import load_script

TOOLS = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'tools')
# Appended, so that tools/*.py never shadow another module.
if TOOLS not in sys.path:
    sys.path.append(TOOLS)


@pytest.fixture(scope='module')
def train_tool() -> ModuleType:
    """tools/train.py as a module, once per test file."""
    return load_script('tools/train.py')


@pytest.fixture(scope='module')
def test_tool() -> ModuleType:
    """tools/test.py as a module, once per test file."""
    return load_script('tools/test.py')


@pytest.fixture
def fake_process_group(monkeypatch) -> list:
    """A machine without CUDA whose ``torch.distributed`` has no group yet
    and records the keyword arguments of ``init_process_group`` (in the
    returned list) instead of starting one."""
    import torch
    import torch.distributed as dist
    started = []
    monkeypatch.setattr(dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(dist, 'init_process_group',
                        lambda **kwargs: started.append(kwargs))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    return started
