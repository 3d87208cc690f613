# Copyright (c) boat-mm contributors. All rights reserved.
"""Fingerprint of the six published archs: keys, values, outputs.

For BOAT-Swin and BOAT-CSWin, tiny, small and base, with a fixed seed:
the state-dict keys of the initialised backbone, a checksum of every
value, a checksum of the eval-mode forward output on a fixed odd-sized
image, and the published-checkpoint conversion (a file in the published
layout, built from the family's key map with the backbone's shapes, run
through :func:`boat_mm.models.convert_boat_checkpoint`). A refactor that
must leave checkpoints and numerics alone is checked by writing the
fingerprint before and comparing after::

    python benchmarks/checkpoint_fingerprint.py --out before.json
    # ... change the code ...
    python benchmarks/checkpoint_fingerprint.py --compare before.json

Slow-ish (about a minute on two cores: six full-size models).
"""
import argparse
import hashlib
import json
import sys
from typing import Dict

import torch
from mmengine.logging import MMLogger

import boat_mm  # noqa: F401
from boat_mm.models import boat_families, convert_boat_checkpoint

ARCHS = ('tiny', 'small', 'base')
IMAGE = (1, 3, 67, 45)


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(
        t.view(torch.uint8).numpy().tobytes() +
        str((t.dtype, tuple(t.shape))).encode()).hexdigest()[:16]


def _published_key_map(family, arch: str) -> Dict[str, str]:
    """Published key -> our key of the published ``arch`` with FSLA."""
    return family.published.key_map(
        dict(
            depths=list(family.arch_zoo[arch]['depths']),
            with_fsla=True,
            num_classes=None))


def fingerprint(family, arch: str) -> dict:
    torch.manual_seed(0)
    model = family(arch=arch, drop_path_rate=0.)
    model.init_weights()
    model.eval()
    state = model.state_dict()
    torch.manual_seed(1)
    x = torch.randn(IMAGE)
    with torch.no_grad():
        outs = model(x)
    # The published layout: every published key with the value of the key
    # it maps to (inverse value fixes are not needed: the conversion is
    # checked against the fingerprint before the change, not against our
    # weights).
    key_map = _published_key_map(family, arch)
    published = {
        src: state[dst[len('backbone.'):]]
        for src, dst in key_map.items()
    }
    found, converted = convert_boat_checkpoint({'model': published})
    assert found is family, (found, family)
    return dict(
        keys=list(state),
        values={
            k: _digest(v)
            for k, v in state.items()
        },
        outputs=[_digest(o) for o in outs],
        published_keys=[list(pair) for pair in key_map.items()],
        converted={
            k: _digest(v)
            for k, v in converted.items()
        })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument('--out', help='write the fingerprint to this file')
    group.add_argument('--compare', help='compare with this fingerprint')
    args = parser.parse_args()
    torch.set_num_threads(1)
    # init_weights logs every parameter at INFO.
    MMLogger.get_current_instance().setLevel('WARNING')
    result = {}
    for family in boat_families():
        for arch in ARCHS:
            name = f'{family.__name__}-{arch}'
            result[name] = fingerprint(family, arch)
            print(f'{name}: {len(result[name]["keys"])} keys, outputs '
                  f'{result[name]["outputs"]}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    bad = 0
    for name in sorted(set(before) | set(result)):
        old, new = before.get(name), result.get(name)
        if old is None or new is None:
            print(f'{name}: only {"after" if old is None else "before"}')
            bad += 1
            continue
        for field in old:
            if old[field] != new[field]:
                print(f'{name}: {field} differs')
                bad += 1
    print('identical' if not bad else f'{bad} differences')
    return int(bad > 0)


if __name__ == '__main__':
    sys.exit(main())
