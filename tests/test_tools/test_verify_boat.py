# Copyright (c) boat-mm contributors. All rights reserved.
"""verify_boat.py's report: every output compared (with the max error and
the tolerance) or skipped (with why), and the weights used. The public
code is replaced here by a stub whose differences are given, so that the
report is checked without it (test_parity_tools.py runs the tool against
the public code when BOAT_REF_REPO is set)."""
import os.path as osp
import sys

import pytest
from published_files import write_published_cswin

from boat_mm.models.backbones import BOATCSWin, BOATSwin

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO, 'tools', 'model_converters'))
import verify_boat  # noqa: E402

sys.path.remove(osp.join(REPO, 'tools', 'model_converters'))


def _rows(lines):
    return [[c.strip() for c in line.strip('|').split('|')]
            for line in lines[2:]]


def test_table_lists_compared_and_skipped_outputs():
    diffs = {
        f'stage{i} b{b}': 10.0**-(i + 4)
        for i in (1, 2, 3)
        for b in (1, 2)
    }
    diffs['stage3 b2'] = 2e-4  # over the tolerance
    rows = _rows(verify_boat.table(BOATCSWin, {'float32': diffs}, 1e-4))
    assert [r[0] for r in rows] == [
        'stage1', 'stage1', 'stage2', 'stage2', 'stage3', 'stage3', 'stage4',
        'logits'
    ]
    for out, batch, dtype, err, tol, result in rows[:6]:
        diff = diffs[f'{out} b{batch}']
        assert (dtype, float(err), tol) == ('float32', float(f'{diff:.3g}'),
                                            '0.0001')
        assert result == ('ok' if diff <= 1e-4 else 'over')
    assert rows[6][-1].startswith('skipped: the public code pairs the '
                                  'samples of a batch in stage 4')
    assert rows[7][-1] == 'skipped: computed from stage 4 (see stage4)'
    # BOAT-Swin compares everything; a second dtype adds its rows.
    full = {f'{o} b1': 0. for o in verify_boat.OUTPUTS}
    rows = _rows(
        verify_boat.table(BOATSwin, {
            'float32': full,
            'float64': full
        }, 1e-4))
    assert len(rows) == 10 and not any('skipped' in r[-1] for r in rows)


@pytest.mark.parametrize('ema', [False, True])
def test_report_of_a_published_file(tmp_path, capsys, monkeypatch, ema):
    """The checkpoint route: the family and arch come from the file, the
    weights named in the report are those loaded into the reference."""
    src = write_published_cswin(str(tmp_path / 'cswin_tiny.pth.tar'))[0]
    loaded = {}

    class Reference:

        def load_state_dict(self, state, strict):
            loaded['first'] = float(next(iter(state.values())).flatten()[0])

    monkeypatch.setattr(verify_boat, 'import_public_module',
                        lambda repo, family: None)
    monkeypatch.setattr(verify_boat, 'build_reference',
                        lambda module, family, arch: Reference())

    def fake_verify(family, ref, seed=0, dtype=None):
        return {f'stage{i} b{b}': 1e-6 for i in (1, 2, 3) for b in (1, 2)}

    monkeypatch.setattr(verify_boat, 'verify', fake_verify)
    argv = [src, '--ref-repo', str(tmp_path)] + (['--ema'] if ema else [])
    assert verify_boat.main(argv) == 0
    out = capsys.readouterr().out
    # Tensor 0 is 0 in state_dict and 0.5 in state_dict_ema.
    assert loaded['first'] == (0.5 if ema else 0.)
    key = 'state_dict_ema' if ema else 'state_dict'
    assert (f"BOAT-CSWin-tiny; weights: '{key}' of {src} "
            f"({'EMA' if ema else 'not EMA'})") in out
    rows = [r for r in out.splitlines() if r.startswith('| stage')]
    assert len(rows) == 7 and '| stage4 | - |' in out
    assert 'PASS (every compared output within tol 0.0001)' in out


@pytest.mark.parametrize('float64_error', [1e-7, 1e-3])
def test_float32_miss_is_checked_in_float64(monkeypatch, capsys,
                                            float64_error):
    """Over the tolerance in float32, the comparison is repeated in
    float64: agreement there passes (with a note); a miss there too fails,
    exit status 1."""
    monkeypatch.setattr(verify_boat, 'import_public_module',
                        lambda repo, family: None)
    monkeypatch.setattr(verify_boat, 'build_reference',
                        lambda module, family, arch: None)
    monkeypatch.setattr(verify_boat, 'randomise', lambda ref, seed: None)
    errors = {'float32': 2e-4, 'float64': float64_error}

    def fake_verify(family, ref, seed=0, dtype=None):
        error = errors[str(dtype).split('.')[-1]]
        return {
            f'{o} b{b}': error
            for o in verify_boat.OUTPUTS
            for b in (1, 2)
        }

    monkeypatch.setattr(verify_boat, 'verify', fake_verify)
    code = verify_boat.main(['--ref-repo', 'x', '--family', 'swin'])
    out = capsys.readouterr().out
    assert 'float32 differs by 0.0002 > 0.0001; float64 ' in out
    if float64_error < 1e-4:
        assert code == 0
        assert 'float64 agrees (1e-07): the float32 difference comes from '\
            'cluster ranks tied to rounding.' in out
        assert out.rstrip().endswith(
            'PASS (every compared output within tol 0.0001)')
    else:
        assert code == 1
        assert 'float64 differs too (0.001).' in out
        assert out.rstrip().endswith('FAIL (an output exceeds tol 0.0001)')
    rows = [r for r in out.splitlines() if r.startswith('| logits')]
    assert len(rows) == 4  # batches 1 and 2, in float32 and float64
