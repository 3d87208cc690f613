# Copyright (c) boat-mm contributors. All rights reserved.
"""The parity tools against the public BOAT implementation.

They need a checkout of github.com/mahaoyuHKU/pytorch-boat (never part of
boat-mm) and its imports ``timm`` and ``einops``; set ``BOAT_REF_REPO`` to
its root, e.g.::

    git clone https://github.com/mahaoyuHKU/pytorch-boat /tmp/boat_ref
    BOAT_REF_REPO=/tmp/boat_ref pytest tests/test_tools/test_parity_tools.py

Without it every test here is skipped, with that reason. All run on the
CPU (the tools neutralise the original's ``.cuda()`` calls); about a
minute, plus a few minutes for ``get_flops.py --check-reference``.
"""
import importlib.util
import os
import os.path as osp
import subprocess
import sys
from typing import List

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
REF_REPO = os.environ.get('BOAT_REF_REPO', '')

pytestmark = [
    pytest.mark.skipif(
        not REF_REPO,
        reason='set BOAT_REF_REPO to a checkout of '
        'github.com/mahaoyuHKU/pytorch-boat to run the parity tools'),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ('timm', 'einops')),
        reason='the public BOAT code needs timm and einops '
        '(pip install -r requirements/optional.txt)'),
]


@pytest.fixture(scope='module', autouse=True)
def ref_repo() -> str:
    # A variable that points nowhere is a mistake, not a reason to skip.
    for folder in ('BOAT-Swin', 'BOAT-CSWin'):
        assert osp.isdir(osp.join(REF_REPO, folder)), (
            f'BOAT_REF_REPO={REF_REPO!r} is not a pytorch-boat checkout '
            f'(no {folder}/ folder)')
    return REF_REPO


def run_tool(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


VERIFY = osp.join(REPO, 'tools', 'model_converters', 'verify_boat.py')


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_verify_boat_random_weights(family, ref_repo):
    out = run_tool(VERIFY, '--ref-repo', ref_repo, '--family', family,
                   '--arch', 'tiny')
    assert 'PASS' in out and 'weights: random (seed 0' in out
    rows = [r.split(' | ') for r in out.splitlines() if r.startswith('| ')]
    compared = {r[0][2:] for r in rows if r[-1].strip(' |') == 'ok'}
    skipped = {r[0][2:] for r in rows if 'skipped' in r[-1]}
    if family == 'swin':
        assert compared == {'stage1', 'stage2', 'stage3', 'stage4', 'logits'}
    else:
        assert compared == {'stage1', 'stage2', 'stage3'}
        assert skipped == {'stage4', 'logits'}


def _public_swin_tiny_state(ref_repo: str) -> dict:
    sys.path.insert(0, osp.dirname(VERIFY))
    try:
        from boat_tools.reference import import_public_module
        from verify_boat import build_reference
        model = build_reference(
            import_public_module(ref_repo, 'swin'), 'swin', 'tiny')
    finally:
        sys.path.remove(osp.dirname(VERIFY))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            # Distinct norms and biases, so that a swapped one shows.
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.state_dict()


def test_verify_boat_on_a_published_layout_file(ref_repo, tmp_path):
    """The checkpoint path of the tool: a file saved from the public
    model (as the released BOAT-Swin files: weights under ``model``)."""
    path = str(tmp_path / 'boat_swin_tiny.pth')
    torch.save(dict(model=_public_swin_tiny_state(ref_repo)), path)
    out = run_tool(VERIFY, path, '--ref-repo', ref_repo)
    assert 'BOAT-Swin-tiny' in out and 'PASS' in out


def test_check_fsla_parity(ref_repo):
    out = run_tool(
        osp.join(REPO, 'tools', 'analysis_tools', 'check_fsla_parity.py'),
        '--ref-repo', ref_repo)
    rows: List[str] = [
        r for r in out.splitlines() if r.startswith(('| swin', '| cswin'))
    ]
    assert len(rows) == 12  # 2 families x 3 stages x 2 dtypes
    assert 'FAILED' not in out


def test_get_flops_check_reference():
    """Params and multiply-adds of the six classifiers against the counts
    of the original models (configs/*/README.md)."""
    out = run_tool(
        osp.join(REPO, 'tools', 'analysis_tools', 'get_flops.py'),
        '--check-reference',
        timeout=1500)
    ok = {
        row.split()[0]
        for row in out.splitlines()
        if row.startswith('boat-') and row.split()[-1] == 'yes'
    }
    assert len(ok) == 6, out[-3000:]
