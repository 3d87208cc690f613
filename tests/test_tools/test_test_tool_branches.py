# Copyright (c) boat-mm contributors. All rights reserved.
"""tools/test.py's ``--show`` / ``--show-dir`` and ``--tta`` on configs the
other tests do not give it: no visualization hook, a hook of another
type, a wrapped test dataset, a config without TTA settings. Config
level only (no model is built)."""
from argparse import Namespace

import pytest
from boat_tools.cli import UsageError
from mmengine.config import Config
from repo_scripts import load_script


@pytest.fixture(scope='module')
def tool():
    return load_script('tools/test.py')


def _show(show_dir=None):
    return Namespace(show=False, show_dir=show_dir, interval=3, wait_time=0.)


def _cfg(scope, hook=None, **extra):
    hooks = {} if hook is None else dict(visualization=hook)
    return Config(dict(default_scope=scope, default_hooks=hooks, **extra))


def test_show_without_a_visualization_hook(tool):
    with pytest.raises(
            UsageError,
            match='--show/--show-dir need a visualization hook '
            'in default_hooks'):
        tool._visualization(_cfg('mmseg'), _show('vis'))


def test_show_with_hooks_of_other_types(tool):
    """A hook of the config's own making is configured, not replaced;
    mmseg's ``--show-dir`` needs mmseg's hook, whose folder it sets."""
    cfg = _cfg('mmseg', dict(type='MyHook'))
    with pytest.raises(
            UsageError,
            match="--show-dir of an mmseg config needs mmseg's "
            "SegVisualizationHook .* got 'MyHook'"):
        tool._visualization(cfg, _show('vis'))
    tool._visualization(cfg, _show())
    hook = cfg.default_hooks.visualization
    assert hook.type == 'MyHook' and hook.draw and hook.interval == 3
    cfg = _cfg('mmpretrain', dict(type='MyHook'))
    tool._visualization(cfg, _show('vis'))
    hook = cfg.default_hooks.visualization
    assert hook.type == 'MyHook' and hook.enable and hook.out_dir == 'vis'
    cfg = _cfg('mmdet', dict(type='DetVisualizationHook'))
    tool._visualization(cfg, _show())
    hook = cfg.default_hooks.visualization
    assert hook.type == 'DetIntervalVisualizationHook' and hook.draw
    assert 'test_out_dir' not in hook


def _repeated(scope: str, model: str, dataset: dict) -> Config:
    """A config of ``model`` whose test dataset is ``dataset`` inside a
    ``RepeatDataset``."""
    return _cfg(
        scope,
        model=dict(type=model),
        test_dataloader=dict(
            dataset=dict(type='RepeatDataset', times=1, dataset=dataset)))


def _pipeline():
    return [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs')
    ]


def test_detector_tta_of_a_wrapped_test_dataset(tool):
    """mmdet's flip TTA is built from the pipeline of the dataset inside
    the wrappers, and given to that dataset (a wrapper takes no
    pipeline), as mmdet's test tool does."""
    inner = dict(type='CocoDataset', data_root='coco', pipeline=_pipeline())
    cfg = _repeated(
        'mmdet', 'RetinaNet',
        dict(type='ClassBalancedDataset', oversample_thr=0., dataset=inner))
    tool._tta(cfg)
    wrapper = cfg.test_dataloader.dataset
    assert 'pipeline' not in wrapper and 'pipeline' not in wrapper.dataset
    pipeline = wrapper.dataset.dataset.pipeline
    assert [t['type'] for t in pipeline
            ] == ['LoadImageFromFile', 'Resize', 'TestTimeAug']
    flips, pack = pipeline[-1]['transforms']
    assert [f['prob'] for f in flips] == [1., 0.]
    assert pack[0]['type'] == 'PackDetInputs'
    assert cfg.model.type == 'DetTTAModel'
    assert cfg.model.module.type == 'RetinaNet'


def test_tta_settings_missing(tool):
    """An mmseg config without tta_model / tta_pipeline (mmseg's
    default_runtime and dataset bases define them): the error names what
    is missing; an mmpretrain config's own tta_pipeline is kept."""
    cfg = _cfg('mmseg', test_dataloader=dict(dataset=dict(pipeline=[])))
    with pytest.raises(
            UsageError, match=r"--tta needs \['tta_model', 'tta_pipeline'\]"):
        tool._tta(cfg)
    own = [dict(type='LoadImageFromFile'), dict(type='MyTTA')]
    cfg = _cfg(
        'mmpretrain',
        model=dict(type='ImageClassifier'),
        tta_pipeline=own,
        test_dataloader=dict(dataset=dict(pipeline=[])))
    tool._tta(cfg)
    assert cfg.test_dataloader.dataset.pipeline == own
    assert cfg.model.type == 'mmpretrain.AverageClsScoreTTA'


def test_classifier_tta_of_a_wrapped_test_dataset(tool):
    """mmpretrain's flip averaging, also inside a dataset wrapper."""
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    cfg = _repeated('mmpretrain', 'ImageClassifier',
                    dict(type='ImageNet', pipeline=pipeline))
    tool._tta(cfg)
    wrapper = cfg.test_dataloader.dataset
    assert 'pipeline' not in wrapper
    tta = wrapper.dataset.pipeline
    assert tta[0] == pipeline[0] and tta[-1]['type'] == 'TestTimeAug'
    flips, pack = tta[-1]['transforms']
    assert [f['prob'] for f in flips] == [1., 0.] and pack == [pipeline[-1]]
