# Copyright (c) boat-mm contributors. All rights reserved.
"""One ``type=`` name builds under the mmseg and mmpretrain scopes."""
import pytest
import torch.nn as nn
from mmengine.registry import DefaultScope, init_default_scope

import boat_mm  # noqa: F401
from boat_mm.models import boat_families
from boat_mm.registry import MODELS

FAMILY_NAMES = [f.__name__ for f in boat_families()]
BOAT_NAMES = FAMILY_NAMES + ['FeatureSpaceLocalAttention']


def _child_registries():
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    return {'mmseg': SEG_MODELS, 'mmpretrain': PRETRAIN_MODELS}


@pytest.fixture
def throwaway_module():
    name = '_BoatMMRegistryProbe'

    @MODELS.register_module(name=name)
    class _Probe(nn.Module):

        def __init__(self, width: int = 3):
            super().__init__()
            self.width = width

    yield name, _Probe
    MODELS._module_dict.pop(name)


@pytest.mark.parametrize('scope', ['mmseg', 'mmpretrain'])
def test_root_registration_builds_in_child_scopes(scope, throwaway_module):
    name, cls = throwaway_module
    registry = _child_registries()[scope]
    with DefaultScope.overwrite_default_scope(scope):
        obj = registry.build(dict(type=name, width=5))
    assert isinstance(obj, cls) and obj.width == 5


@pytest.mark.parametrize('scope', ['mmseg', 'mmpretrain'])
def test_boat_modules_build_in_both_scopes(scope):
    init_default_scope(scope)
    registry = _child_registries()[scope]
    fsla = registry.build(
        dict(type='FeatureSpaceLocalAttention', embed_dims=8, num_heads=2))
    assert fsla.num_heads == 2
    for name in FAMILY_NAMES:
        assert registry.get(name) is MODELS.get(name)


def test_names_do_not_clash_with_upstream():
    for scope, registry in _child_registries().items():
        registry.import_from_location()
        for name in BOAT_NAMES:
            assert name in MODELS.module_dict, name
            assert name not in registry.module_dict, (
                f'{name} also registered in {scope}')
