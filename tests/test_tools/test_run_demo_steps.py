# Copyright (c) boat-mm contributors. All rights reserved.
"""The steps of tools/run_demo.py that its option tests stand in for: the
command runner (output streamed, returned and logged; a failure stops the
demo, naming the command) and the checkpoint the test step takes."""
import os.path as osp
import runpy
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture(scope='module')
def demo():
    return runpy.run_path(
        osp.join(REPO, 'tools', 'run_demo.py'), run_name='boat_demo_steps')


def test_run_streams_returns_and_logs(demo, tmp_path, capsys):
    log = str(tmp_path / 'out.log')
    script = 'import sys; print("one"); print("two", file=sys.stderr)'
    out = demo['_run']([sys.executable, '-c', script], log)
    assert out.splitlines() == ['one', 'two']
    with open(log) as f:
        assert f.read() == out
    printed = capsys.readouterr().out
    assert printed.startswith(f'$ {sys.executable} -c ')
    assert printed.endswith('one\ntwo\n')
    with pytest.raises(SystemExit, match='exit status 3: .* -c'):
        demo['_run']([sys.executable, '-c', 'raise SystemExit(3)'])


def test_last_checkpoint(demo, tmp_path):
    """MMEngine's ``last_checkpoint`` marker when it names a file, else
    the highest ``iter_N.pth`` by number, not by name."""
    last = demo['_last_checkpoint']
    with pytest.raises(SystemExit, match='No checkpoint in'):
        last(str(tmp_path))
    for n in (9, 10, 2):
        (tmp_path / f'iter_{n}.pth').write_bytes(b'')
    assert last(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
    marker = tmp_path / 'last_checkpoint'
    marker.write_text(str(tmp_path / 'iter_9.pth') + '\n')
    assert last(str(tmp_path)) == str(tmp_path / 'iter_9.pth')
    marker.write_text(str(tmp_path / 'gone.pth'))
    assert last(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
