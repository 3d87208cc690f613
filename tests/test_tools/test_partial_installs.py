# Copyright (c) boat-mm contributors. All rights reserved.
"""The tools where the user's install differs from ours: a partial
OpenMMLab stack (say mmpretrain without mmseg and mmdet) and a working
directory outside the checkout.

A missing library is simulated by a meta-path finder that refuses it, in
a fresh interpreter (``sitecustomize`` on ``PYTHONPATH``), or in this
process by ``sys.modules[name] = None``, which makes its import fail as
an absent module's does.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from boat_tools import cli

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CLS = osp.join(REPO, 'configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py')
DET = osp.join(REPO, 'configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py')

BLOCKER = '''
import os, sys
BLOCKED = os.environ['BLOCK_MODULES'].split(',')


class _Blocker:
    """Refuses the blocked modules as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + '.') for b in BLOCKED):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''

PROBE = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import boat_mm
from mmengine.registry import MODELS
import train
results = {'registered': MODELS.get('BOATCSWin') is not None}
for name, config in zip(('cls', 'det'), sys.argv[2:]):
    try:
        # A missing data_root: the run stops at the data check, after the
        # check of its library, before anything is built or read.
        train.main([config, '--cfg-options',
                    'train_dataloader.dataset.data_root=/nonexistent'])
    except SystemExit as exit:
        results[name] = exit.code
results['loaded'] = sorted(m for m in ('mmdet', 'mmseg', 'mmpretrain')
                           if m in sys.modules)
print(json.dumps(results))
'''


def test_tools_of_an_installed_task_run_without_the_others(tmp_path):
    """mmseg and mmdet absent: boat_mm imports, a classification config
    runs up to its data; a detection one says what to install, in one
    line (and so does a segmentation one: the next test)."""
    (tmp_path / 'sitecustomize.py').write_text(BLOCKER)
    env = dict(
        os.environ,
        BLOCK_MODULES='mmseg,mmdet',
        PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]),
        OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-c', PROBE,
         osp.join(REPO, 'tools'), CLS, DET],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == dict(
        registered=True, cls=2, det=2, loaded=['mmpretrain'])
    errors = [
        line for line in proc.stderr.splitlines()
        if line.startswith('train.py: error: ')
    ]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "'/nonexistent' does not exist" in errors[0]
    assert errors[1] == (
        f"train.py: error: {DET} needs mmdet (default_scope='mmdet'), but "
        "mmdet does not import here (no module named 'mmdet'): install "
        'mmdet (`pip install "boat-mm[det]"` or `mim install mmdet`)')


@pytest.mark.parametrize(
    'scope, blocked, missing, expected',
    [('mmseg', 'mmseg.models', 'mmseg.models',
      'install mmsegmentation (`pip install "boat-mm[seg]"`'),
     ('mmpretrain', 'mmpretrain.models', 'mmpretrain.models',
      'install mmpretrain (`pip install "boat-mm[cls]"`'),
     ('mmseg', None, 'ftfy', 'install ftfy, which mmsegmentation needs'),
     ('mmdet', None, 'mmcv._ext', 'install mmcv built with its ops (`mim '
      'install "mmcv>=2.1.0,<2.2.0"`'),
     ('mmseg', None, 'cv2', 'install opencv-python, which mmsegmentation')])
def test_missing_library_or_dependency_is_named(scope, blocked, missing,
                                                expected, monkeypatch):
    """What is missing and what to install: the library, one of its
    dependencies, mmcv's compiled ops."""
    import importlib

    from mmengine.config import Config
    if blocked:
        monkeypatch.setitem(sys.modules, blocked, None)
    else:
        real = importlib.import_module

        def import_module(name, package=None):
            if name.endswith('.models'):  # the library's own import fails
                raise ModuleNotFoundError(
                    f'No module named {missing!r}', name=missing)
            return real(name, package)

        monkeypatch.setattr(importlib, 'import_module', import_module)
    with pytest.raises(cli.UsageError) as err:
        cli.check_scope_installed(Config(dict(default_scope=scope)), 'x.py')
    text = str(err.value)
    assert f"no module named '{missing}'" in text and expected in text
    assert text.startswith('x.py needs ')


def test_relative_config_from_elsewhere_names_the_shipped_one(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = osp.join('configs', 'boat_upernet_ade20k.py')
    with pytest.raises(FileNotFoundError) as err:
        cli.load_config(rel)
    assert (f"boat-mm's config of that name is {osp.join(REPO, rel)}"
            in str(err.value))
    with pytest.raises(FileNotFoundError) as err:
        cli.load_config('mine.py')
    assert f"boat-mm's configs are in {osp.join(REPO, 'configs')}" in str(
        err.value)


def test_data_hint_runs_from_the_working_directory(tmp_path, monkeypatch):
    """The commands of the missing-data hint: boat-mm's tools and configs
    by absolute path away from the checkout, data paths relative."""
    from boat_tools import config
    from mmengine.config import Config
    cfg = Config(
        dict(
            default_scope='mmseg',
            train_dataloader=dict(dataset=dict(data_root='data/none'))))

    def message() -> str:
        with pytest.raises(FileNotFoundError) as err:
            config.check_data_roots(cfg)
        return str(err.value)

    monkeypatch.chdir(REPO)
    assert ('`make demo` generates' in message()
            and '`python tools/dataset_converters/gen_synthetic_data.py '
            'ade20k data/ade_synthetic`' in message())
    monkeypatch.chdir(tmp_path)
    assert (f'`make demo` (in {REPO}) generates' in message()
            and f'`python {REPO}/tools/dataset_converters/gen_synthetic_'
            'data.py ade20k data/ade_synthetic`' in message()
            and f'trains {REPO}/configs/demo/' in message())
    # An installed package (boat_mm/.mim): no Makefile, so no make demo.
    monkeypatch.setattr(config, 'ROOT', str(tmp_path / '.mim'))
    assert ('Without it, generate a small synthetic ADE20K-like dataset '
            f'with `python {tmp_path}/.mim/tools/dataset_converters/'
            in message() and 'make' not in message())
