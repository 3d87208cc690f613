# Copyright (c) boat-mm contributors. All rights reserved.
"""Every shipped config loads and builds its full model."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

import boat_mm  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    osp.relpath(p, ROOT)
    for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'),
                       recursive=True) if '_base_' not in p)

# Parameter counts of the published classifiers (reference doc, 224).
PARAMS_M = {
    'boat-swin-tiny_16xb64_in1k.py': 30.27,
    'boat-swin-small_16xb64_in1k.py': 55.16,
    'boat-swin-base_16xb64_in1k.py': 97.61,
    'boat-cswin-tiny_8xb256_in1k.py': 26.39,
    'boat-cswin-small_8xb256_in1k.py': 40.11,
    'boat-cswin-base_8xb128_in1k.py': 89.63,
}


def test_every_family_has_cls_and_seg_configs():
    names = [osp.basename(c) for c in CONFIGS]
    assert set(PARAMS_M) <= set(names)
    for family in ('swin', 'cswin'):
        for arch in ('tiny', 'small', 'base'):
            assert (f'boat-{family}-{arch}_upernet_8xb2-160k_ade20k-'
                    '512x512.py') in names
    assert 'boat_upernet_ade20k.py' in names


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_full_model(path):
    cfg = Config.fromfile(osp.join(ROOT, path))
    scope = cfg.default_scope
    assert scope in ('mmseg', 'mmpretrain')
    assert 'boat_mm' in cfg.custom_imports['imports']
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
        # The converted ImageNet weights are not part of the repo.
        cfg.model.backbone.init_cfg = None
    else:
        from mmpretrain.registry import MODELS
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ in ('BOATSwin', 'BOATCSWin')
    expected = PARAMS_M.get(osp.basename(path))
    if expected is not None:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert round(params, 2) == expected
