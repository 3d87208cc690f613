# Copyright (c) boat-mm contributors. All rights reserved.
"""``import boat_mm`` registers the models and loads no other OpenMMLab
library, plotting, COCO or export stack (checked in a fresh interpreter;
the import time itself is measured by benchmarks/import_time.py)."""
import json
import os.path as osp
import subprocess
import sys

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
