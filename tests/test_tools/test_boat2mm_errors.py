# Copyright (c) boat-mm contributors. All rights reserved.
"""boat2mm.py on files it cannot convert, which no other test gave: one
line naming the file and the problem, exit status 2."""
import os.path as osp
import sys
from collections import OrderedDict

import pytest
import torch
from published_files import classifier_shapes, write_published_cswin
from repo_scripts import load_script


@pytest.fixture(scope='module')
def boat2mm():
    return load_script('tools/model_converters/boat2mm.py')


def _error(tool, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('boat2mm.py: error: ') and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_file_of_another_object(boat2mm, tmp_path, capsys):
    src = str(tmp_path / 'list.pth')
    torch.save([torch.ones(2)], src)
    err = _error(boat2mm, [src, str(tmp_path / 'out.pth')], capsys)
    assert f'{src}: {src} holds a list, not a dict of weights.' in err


def test_published_backbone_without_classifier_head(boat2mm, tmp_path, capsys):
    """A published-layout BOAT-CSWin file without ``head.*`` is detected
    as such, and refused: boat2mm converts the classifiers."""
    weights = OrderedDict((k, torch.zeros(()).expand(shape))
                          for k, shape in classifier_shapes().items()
                          if not k.startswith('head.'))
    src = write_published_cswin(str(tmp_path / 'headless.pth'), weights)[0]
    err = _error(boat2mm, [src, str(tmp_path / 'out.pth')], capsys)
    assert 'has no classifier head (head.weight)' in err
    assert not osp.exists(tmp_path / 'out.pth')


def test_safetensors_file_without_safetensors(boat2mm, tmp_path, capsys,
                                              monkeypatch):
    save_file = pytest.importorskip('safetensors.torch').save_file
    src = str(tmp_path / 'w.safetensors')
    save_file({'w': torch.ones(2)}, src)
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)
    err = _error(boat2mm, [src, str(tmp_path / 'out.pth')], capsys)
    assert 'is a safetensors file: pip install safetensors to read it.' in err
