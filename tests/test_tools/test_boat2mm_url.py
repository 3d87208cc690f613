# Copyright (c) boat-mm contributors. All rights reserved.
"""boat2mm.py with a URL: downloaded (progress bar) into the cache that
MMEngine's load_from_http uses, converted, checked by a strict load; a
local HTTP server on 127.0.0.1 serves a generated published-layout
BOAT-CSWin-T file under a Dropbox-like ``?dl=0`` link."""
import functools
import http.server
import os.path as osp
import threading

import pytest
import torch
from published_files import write_published_cswin
from repo_scripts import load_script

from boat_mm.utils import PublishedCheckpointError


@pytest.fixture(scope='module')
def boat2mm():
    return load_script('tools/model_converters/boat2mm.py')


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):
        _Handler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    www = tmp_path_factory.mktemp('www')
    _, shapes = write_published_cswin(str(www / 'cswin_tiny.pth.tar'))
    (www / 'moved.pth').write_text('<!DOCTYPE html><html>gone</html>')
    httpd = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(_Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', str(www), shapes
    httpd.shutdown()
    httpd.server_close()


def test_url_is_downloaded_cached_converted(boat2mm, server, tmp_path,
                                            monkeypatch, capsys):
    base, www, shapes = server
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    url = f'{base}/cswin_tiny.pth.tar?dl=0'
    dst = str(tmp_path / 'out.pth')
    _Handler.requests.clear()
    assert boat2mm.main([url, dst, '--ema']) == 0
    out, err = capsys.readouterr()
    cached = osp.join(
        str(tmp_path / 'torch'), 'hub', 'checkpoints', 'cswin_tiny.pth.tar')
    assert f'downloading {url} to {cached}' in out
    assert '100%' in err  # torch.hub's progress bar
    # Dropbox's share link is fetched as a download (dl=1).
    assert _Handler.requests == ['/cswin_tiny.pth.tar?dl=1']
    with open(cached, 'rb') as a, \
            open(osp.join(www, 'cswin_tiny.pth.tar'), 'rb') as b:
        assert a.read() == b.read()
    assert 'checking a strict load' in out
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt['meta']['source'] == url and ckpt['meta']['ema']
    state = ckpt['state_dict']
    assert list(state) == list(shapes)
    for i, (key, shape) in enumerate(shapes.items()):
        assert state[key].shape == shape
        assert bool((state[key] == i + 0.5).all()), key

    # Again: from the cache, no request.
    assert boat2mm.main([url, str(tmp_path / 'again.pth')]) == 0
    assert f'using the cached {cached}' in capsys.readouterr().out
    assert len(_Handler.requests) == 1

    # MMEngine's own URL loading finds the same file, and says convert.
    from mmengine.runner.checkpoint import CheckpointLoader
    with pytest.raises(PublishedCheckpointError, match='boat2mm.py SRC DST'):
        CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert len(_Handler.requests) == 1


def test_a_web_page_is_not_a_checkpoint(boat2mm, server, tmp_path, monkeypatch,
                                        capsys):
    base = server[0]
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    for url, message in [(f'{base}/moved.pth?dl=0', 'served a web page'),
                         (f'{base}/missing.pth', 'cannot download')]:
        with pytest.raises(SystemExit) as exc:
            boat2mm.main([url, str(tmp_path / 'x.pth')])
        assert exc.value.code == 2
        # After the progress bar, one line.
        err = capsys.readouterr().err.strip().splitlines()
        errors = [e for e in err if 'error' in e]
        assert errors == err[-1:] and message in err[-1], err
        assert err[-1].startswith('boat2mm.py: error: ')
    assert not osp.exists(tmp_path / 'x.pth')
