# Copyright (c) boat-mm contributors. All rights reserved.
"""What ``import boat_mm`` costs on top of what every OpenMMLab plugin pays.

Each sample is a fresh interpreter that imports ``mmengine.model`` and
``mmcv.cnn`` (the base), then ``boat_mm``, timing both steps in the same
process; samples alternate with interpreters that import the base alone,
so that both see the same state of the file cache. Prints the medians,
the ratio (extra time of ``boat_mm`` / time of the base; the target of
docs/design.md is at most 0.25) and the top-level packages that
``import boat_mm`` adds, flagging the heavy ones it must not load.

Example::

    python benchmarks/import_time.py --repeats 7
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

#: Packages ``import boat_mm`` must not load (other OpenMMLab libraries,
#: plotting, COCO tools, export and FLOP counters).
HEAVY = ('mmpretrain', 'mmseg', 'mmdet', 'matplotlib', 'scipy', 'pycocotools',
         'shapely', 'onnx', 'fvcore')

_PROBE = r'''
import json, sys, time
t0 = time.perf_counter()
import mmengine.model, mmcv.cnn
t1 = time.perf_counter()
before = {m.split('.')[0] for m in sys.modules}
if {with_boat}:
    import boat_mm
t2 = time.perf_counter()
after = {m.split('.')[0] for m in sys.modules}
print(json.dumps(dict(base=t1 - t0, boat=t2 - t1,
                      added=sorted(after - before))))
'''


def sample(with_boat: bool) -> dict:
    """One fresh interpreter's timings (and the packages boat_mm adds)."""
    code = _PROBE.replace('{with_boat}', str(with_boat))
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    out = subprocess.run([sys.executable, '-c', code],
                         check=True,
                         capture_output=True,
                         text=True,
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    sample(True)  # warm the file cache and the bytecode
    base, extra, added = [], [], []
    for _ in range(args.repeats):
        base.append(sample(False)['base'])
        run = sample(True)
        base.append(run['base'])
        extra.append(run['boat'])
        added = run['added']
    t_base, t_extra = statistics.median(base), statistics.median(extra)
    heavy = [m for m in added if m in HEAVY]
    print(f'import mmengine.model, mmcv.cnn: {t_base * 1e3:.0f} ms '
          f'(median of {len(base)})')
    print(f'then import boat_mm: +{t_extra * 1e3:.0f} ms '
          f'(median of {len(extra)})')
    print(f'ratio: {t_extra / t_base:.2f}x (target <= 0.25x)')
    print(f'top-level packages added by boat_mm: {len(added)}: '
          f'{", ".join(added)}')
    print(f'heavy packages loaded: {heavy or "none"}')
    return 1 if heavy else 0


if __name__ == '__main__':
    sys.exit(main())
