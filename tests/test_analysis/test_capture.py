# Copyright (c) boat-mm contributors. All rights reserved.
"""boat_mm/analysis/capture.py: the one capture mechanism
(fsla_input_hooks) sees exactly the input of every FSLA call and leaves
nothing behind. What capture_fsla records is checked against the
recalls in test_attention_recall.py; cluster ids in
tests/test_visualization/test_clusters.py."""
import pytest
import torch
import torch.nn as nn

from boat_mm.analysis import (capture_fsla, check_locations, find_fsla_modules,
                              fsla_input_hooks)
from boat_mm.models import BOATSwin
from boat_mm.models.utils import FeatureSpaceLocalAttention

ARCH = dict(embed_dims=8, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 2))


@pytest.fixture(scope='module')
def backbone() -> BOATSwin:
    torch.manual_seed(0)
    return BOATSwin(
        arch=ARCH, fsla_cfg=dict(group_size=16, overlap=4),
        drop_path_rate=0.).eval()


def _inputs_by_forward_wrapping(backbone, x):
    """Independently: the arguments each FSLA forward receives, by
    wrapping the class's forward for the duration of one call."""
    seen = []
    original = FeatureSpaceLocalAttention.forward

    def forward(self, tokens, hw_shape):
        seen.append((self, tokens.clone(), tuple(hw_shape)))
        return original(self, tokens, hw_shape)

    FeatureSpaceLocalAttention.forward = forward
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        FeatureSpaceLocalAttention.forward = original
    return seen


def test_hooks_see_every_call_input(backbone):
    x = torch.randn(2, 3, 40, 56)
    expected = _inputs_by_forward_wrapping(backbone, x)
    modules = find_fsla_modules(backbone)
    where = {id(m): loc for loc, m in modules.items()}
    calls = []
    with fsla_input_hooks(backbone, lambda *a: calls.append(a)) as wanted:
        with torch.no_grad():
            backbone(x)
    assert wanted == list(modules)
    assert len(calls) == len(expected) == len(modules)
    for (loc, module, tokens, hw), (m, t, h) in zip(calls, expected):
        assert module is m and loc == where[id(m)] and hw == h
        assert torch.equal(tokens, t)
    assert all(not m._forward_pre_hooks for m in backbone.modules())


def test_chosen_locations_and_module_mappings(backbone):
    modules = find_fsla_modules(backbone)
    first, last = list(modules)[0], list(modules)[-1]
    x = torch.randn(1, 3, 32, 32)
    calls = []
    with fsla_input_hooks({
            last: modules[last],
            first: modules[first]
    }, lambda loc, *a: calls.append(loc), [last]):
        with torch.no_grad():
            backbone(x)
            backbone(x)
    assert calls == [last, last]
    assert check_locations(modules, [(float(first[0]), first[1])]) == \
        [first]


def test_hooks_removed_after_an_error(backbone):

    def fail(*args):
        raise RuntimeError('stop')

    with pytest.raises(RuntimeError, match='stop'):
        with fsla_input_hooks(backbone, fail), torch.no_grad():
            backbone(torch.randn(1, 3, 32, 32))
    assert all(not m._forward_pre_hooks for m in backbone.modules())
    with pytest.raises(ValueError, match='max_tokens=1'):
        with capture_fsla(backbone, max_tokens=1), torch.no_grad():
            backbone(torch.randn(1, 3, 32, 32))
    assert all(not m._forward_pre_hooks for m in backbone.modules())


def test_errors(backbone):
    with pytest.raises(
            ValueError,
            match=r'Stage 3, block 5 has no FSLA.*'
            r'FSLA is in: \(stage 0, block 1\)'):
        with fsla_input_hooks(backbone, print, [(3, 5)]):
            pass
    no_fsla = BOATSwin(arch=ARCH, with_fsla=False)
    with pytest.raises(ValueError, match='no FSLA modules'):
        with fsla_input_hooks(no_fsla, print):
            pass
    with pytest.raises(TypeError, match='not a BOAT backbone'):
        with fsla_input_hooks(nn.Linear(2, 2), print):
            pass
    assert all(not m._forward_pre_hooks for m in backbone.modules())
