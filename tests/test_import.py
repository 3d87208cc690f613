# Copyright (c) boat-mm contributors. All rights reserved.
"""``import boat_mm`` registers the models and loads no other OpenMMLab
library, plotting, COCO or export stack (checked in a fresh interpreter;
the import time itself is measured by benchmarks/import_time.py)."""
import importlib
import json
import os.path as osp
import re
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# Other OpenMMLab libraries, plotting, COCO tools, export and FLOP counters
# (as benchmarks/import_time.py).
HEAVY = ('mmpretrain', 'mmseg', 'mmdet', 'matplotlib', 'scipy', 'pycocotools',
         'shapely', 'onnx', 'fvcore')

PROBE = '''
import json, sys
import boat_mm
from mmengine.registry import MODELS
registered = [MODELS.get(n) is not None for n in ('BOATSwin', 'BOATCSWin',
              'FeatureSpaceLocalAttention', 'BOATDropPath')]
print(json.dumps(dict(modules=sorted(sys.modules), registered=registered)))
'''


def test_import_is_light_and_registers():
    out = subprocess.run([sys.executable, '-c', PROBE],
                         check=True,
                         capture_output=True,
                         text=True,
                         cwd=REPO).stdout
    result = json.loads(out.strip().splitlines()[-1])
    top = {m.split('.')[0] for m in result['modules']}
    assert 'boat_mm' in top and 'torch' in top  # the probe ran
    assert not top & set(HEAVY), sorted(top & set(HEAVY))
    assert all(result['registered'])


@pytest.mark.parametrize('module, version, problem', [
    ('torch', '2.3.1', 'torch 2.3.1 is older than 2.4.1'),
    ('mmengine', '0.10.6', 'mmengine 0.10.6 is older than 0.10.7'),
    ('mmengine', '1.0.0', 'mmengine 1.0.0 is not below 1.0.0'),
    ('mmcv', '2.0.1', 'mmcv 2.0.1 is older than 2.1.0'),
    ('mmcv', '2.2.0', 'mmcv 2.2.0 is not below 2.2.0'),
])
def test_unsupported_dependency_is_named(monkeypatch, module, version,
                                         problem):
    from boat_mm.version import check_dependencies
    check_dependencies()  # the installed stack is supported
    monkeypatch.setattr(
        importlib.import_module(module), '__version__', version)
    with pytest.raises(ImportError, match='supports torch>=2.4.1') as err:
        check_dependencies()
    assert problem in str(err.value)


def test_missing_mmcv_is_named(monkeypatch):
    from boat_mm.version import check_dependencies
    monkeypatch.setitem(sys.modules, 'mmcv', None)
    with pytest.raises(
            ImportError, match=r'needs mmcv>=2\.1\.0,<2\.2\.0') as err:
        check_dependencies()
    # Not `mim install`: its prebuilt mmcv 2.1 wheels are for torch 2.0
    # and 2.1, below the supported range; it builds against your torch.
    assert 'mim install' not in str(err.value)
    assert 'built against your torch' in str(err.value)
    # The page it points at says how to build mmcv with its ops.
    doc = re.search(r'see (docs/\S+\.md)\)', str(err.value)).group(1)
    with open(osp.join(REPO, doc), encoding='utf-8') as f:
        text = f.read()
    assert 'MMCV_WITH_OPS=1' in text and '## Installation' in text, doc


def test_supported_ranges_are_what_pip_is_told():
    from boat_mm import version
    lines = set()
    for name in ('runtime.txt', 'mminstall.txt'):
        with open(osp.join(REPO, 'requirements', name)) as f:
            lines |= {line.strip() for line in f}
    assert (f'mmengine>={version.MMENGINE_MIN},<{version.MMENGINE_MAX}'
            in lines)
    assert f'mmcv>={version.MMCV_MIN},<{version.MMCV_MAX}' in lines


IMPORT_REFUSED = '''
import sys
import mmcv
mmengine = sys.modules['mmengine']
sys.modules['mmengine'] = None
try:
    import boat_mm
except ImportError as err:
    print('missing:', err)
sys.modules['mmengine'] = mmengine
mmcv.__version__ = '2.2.0'
try:
    import boat_mm
except ImportError as err:
    print('too new:', err)
'''


def test_import_refuses_a_missing_or_unsupported_dependency():
    """``import boat_mm`` itself runs the check, before anything else needs
    the dependency."""
    out = subprocess.run([sys.executable, '-c', IMPORT_REFUSED],
                         check=True,
                         capture_output=True,
                         text=True,
                         cwd=REPO).stdout
    missing, too_new = out.strip().splitlines()[-2:]
    assert missing.startswith('missing: boat_mm needs mmengine>=0.10.7,<1.0.0')
    assert 'pip install "mmengine>=0.10.7,<1.0.0"' in missing
    assert too_new.startswith('too new: boat_mm 0.1.0 supports')
    assert too_new.endswith('mmcv 2.2.0 is not below 2.2.0: install versions '
                            'of that range')


def test_version_info():
    """``version_info`` as its docstring says, release candidates too."""
    from boat_mm import version
    assert version.parse_version_info('0.1.0') == (0, 1, 0)
    assert version.parse_version_info('0.1.0rc1') == (0, 1, 0, 'rc1')
    assert version.parse_version_info('1.2rc10') == (1, 2, 'rc10')
    assert version.version_info == version.parse_version_info(
        version.__version__)
