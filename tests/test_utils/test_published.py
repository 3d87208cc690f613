# Copyright (c) boat-mm contributors. All rights reserved.
"""A published BOAT checkpoint loaded without converting it gets our one
message naming the converter, through every loading path, whatever else
the pickle holds; the weights-only allow-list stays as strict."""
import pickle

import pytest
import torch
from published_files import write_published_cswin

import boat_mm  # noqa: F401  (installs the hint)
from boat_mm.utils import (PublishedCheckpointError,
                           published_checkpoint_message)
from boat_mm.utils.published import CONVERTER, inspect_checkpoint

CALLS = []


def _record(*args):
    CALLS.append(args)


class _Payload:
    """Runs :func:`_record` if the file's pickle is ever executed."""

    def __reduce__(self):
        return _record, ('the pickle ran', )


@pytest.fixture(scope='module')
def published(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('published') / 'cswin_tiny.pth.tar')
    return write_published_cswin(path, payload=_Payload())[0]


def _assert_our_message(err: BaseException, path: str) -> None:
    text = str(err)
    assert isinstance(err, PublishedCheckpointError), repr(err)
    assert CONVERTER in text and path in text
    assert 'published BOAT-CSWin checkpoint (arch tiny' in text
    assert 'argparse.Namespace' in text
    # Not torch's advice to weaken the loader.
    assert 'add_safe_globals' not in text and 'weights_only' not in text
    assert err.__cause__ is None and err.__suppress_context__
    assert CALLS == []


def test_allow_list_unchanged(published):
    """torch's own weights-only load still refuses the file."""
    with pytest.raises(pickle.UnpicklingError, match='argparse.Namespace'):
        torch.load(published, weights_only=True)
    names = {
        f'{g.__module__}.{g.__qualname__}'
        if not isinstance(g, tuple) else g[1]
        for g in torch.serialization.get_safe_globals()
    }
    assert 'argparse.Namespace' not in names


def test_inspection_runs_nothing(published):
    found = inspect_checkpoint(published)
    assert CALLS == []
    assert 'argparse.Namespace' in found['foreign']
    assert any(name.endswith('._record') for name in found['foreign'])
    weights = found['object']['state_dict']
    stem = weights['module.stage1_conv_embed.0.weight']
    assert stem.device.type == 'meta' and stem.shape == (64, 3, 7, 7)
    assert found['object']['epoch'] == 299


def test_message_names_family_and_converter(published, tmp_path):
    message = published_checkpoint_message(published)
    assert message.startswith(f'{published} is a published BOAT-CSWin '
                              f'checkpoint (arch tiny, 11 classes')
    assert CONVERTER in message
    # Ours and unrelated files are not reported.
    other = str(tmp_path / 'other.pth')
    torch.save(dict(state_dict=dict(w=torch.ones(2))), other)
    assert published_checkpoint_message(other) is None


def _load_by_init_cfg(path):
    from boat_mm.models.backbones import BOATCSWin
    backbone = BOATCSWin(
        arch='tiny',
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    backbone.init_weights()


def _load_by_runner_load_from(path, tmp_path):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            return self.fc(inputs)

    runner = Runner(
        model=Toy(),
        work_dir=str(tmp_path),
        load_from=path,
        default_scope='mmengine')
    runner.load_or_resume()


def _load_by_get_model(path, repo_root):
    import os.path as osp

    from mmpretrain import get_model
    get_model(
        osp.join(repo_root, 'configs', 'boat_cswin',
                 'boat-cswin-tiny_8xb256_in1k.py'),
        pretrained=path)


def _load_by_get_model_name(path):
    from mmpretrain import get_model
    get_model('boat-cswin-tiny_8xb256_in1k', pretrained=path)


@pytest.mark.parametrize(
    'route', ['init_cfg', 'load_from', 'get_model', 'get_model_by_name'])
def test_every_loading_path_says_convert(published, route, tmp_path,
                                         repo_root):
    with pytest.raises(PublishedCheckpointError) as err:
        if route == 'init_cfg':
            _load_by_init_cfg(published)
        elif route == 'load_from':
            _load_by_runner_load_from(published, tmp_path)
        elif route == 'get_model_by_name':
            _load_by_get_model_name(published)
        else:
            _load_by_get_model(published, repo_root)
    _assert_our_message(err.value, published)


def test_published_weights_that_load_still_say_convert(tmp_path):
    """Saved without foreign objects, a published file passes weights-only
    loading; its FSLA weights in the published layout are still refused
    with the message. A plain CSWin/Swin layout (no FSLA) is left to load:
    other models use such files."""
    from mmengine.runner.checkpoint import CheckpointLoader
    path, _ = write_published_cswin(str(tmp_path / 'bare.pth'))
    ckpt = torch.load(path, weights_only=False)
    del ckpt['args']
    torch.save(ckpt, path)
    with pytest.raises(PublishedCheckpointError) as err:
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert CONVERTER in str(err.value) and 'arch tiny' in str(err.value)
    plain = {
        k: v
        for k, v in ckpt['state_dict'].items()
        if 'content_attn' not in k and 'norm3' not in k
    }
    torch.save(dict(state_dict=plain), path)
    assert set(
        CheckpointLoader.load_checkpoint(path)['state_dict']) == set(plain)


def test_other_models_sharing_a_prefix_are_not_called_published(tmp_path):
    """BOAT-Swin's published keys start with ``layers.``, as do other
    models' (mmseg's converted ViTs: ``layers.0.ln1.weight``, with the
    stem at ``patch_embed.projection``): such a file keeps torch's
    weights-only error and the backbone's own mismatch error, not our
    message naming the converter; a published-layout Swin (its stem at
    ``patch_embed.proj``) still gets it."""
    import argparse

    from mmengine.runner.checkpoint import CheckpointLoader

    from boat_mm.models import BOATSwin
    vit = {
        'patch_embed.projection.weight': torch.ones(8, 3, 4, 4),
        'layers.0.ln1.weight': torch.ones(8),
        'layers.0.attn.attn.in_proj_weight': torch.ones(24, 8),
    }
    path = str(tmp_path / 'vit.pth')
    torch.save(dict(state_dict=vit, args=argparse.Namespace(lr=1.)), path)
    with pytest.raises(Exception) as err:
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert not isinstance(err.value, PublishedCheckpointError)
    assert 'argparse.Namespace' in str(err.value)
    torch.save(dict(state_dict=vit), path)
    arch = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
    model = BOATSwin(
        arch=arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(Exception) as err:
        model.init_weights()
    assert 'matches 1 of the' in str(err.value)
    assert 'published' not in str(err.value), err.value
    swin = dict(vit)
    swin['patch_embed.proj.weight'] = swin.pop('patch_embed.projection.weight')
    torch.save(dict(state_dict=swin, args=argparse.Namespace(lr=1.)), path)
    with pytest.raises(PublishedCheckpointError, match='BOAT-Swin'):
        CheckpointLoader.load_checkpoint(path, map_location='cpu')


def test_inspection_of_legacy_and_plain_pickle_files(tmp_path):
    """Files of torch.save's legacy format (before torch 1.6; the object
    follows a magic number, protocol and system info) and plain pickles
    are read too, parameters as meta tensors; a published checkpoint in
    the legacy format gets the same message."""
    legacy = str(tmp_path / 'legacy.pth')
    weights = dict(w=torch.nn.Parameter(torch.ones(2, 3)), b=torch.ones(4))
    torch.save(
        dict(state_dict=weights, epoch=3),
        legacy,
        _use_new_zipfile_serialization=False)
    found = inspect_checkpoint(legacy)
    assert found['foreign'] == [] and found['object']['epoch'] == 3
    for name, shape in (('w', (2, 3)), ('b', (4, ))):
        tensor = found['object']['state_dict'][name]
        assert tensor.device.type == 'meta' and tensor.shape == shape
    plain = tmp_path / 'plain.pkl'
    plain.write_bytes(pickle.dumps(dict(a=1, b=[2])))
    assert inspect_checkpoint(str(plain))['object'] == dict(a=1, b=[2])
    assert inspect_checkpoint(str(tmp_path / 'missing.pth')) is None

    zipped = write_published_cswin(str(tmp_path / 'cswin_tiny.pth.tar'))[0]
    old = str(tmp_path / 'cswin_tiny_legacy.pth.tar')
    torch.save(
        torch.load(zipped, weights_only=False),
        old,
        _use_new_zipfile_serialization=False)
    assert published_checkpoint_message(old).startswith(
        f'{old} is a published BOAT-CSWin checkpoint (arch tiny, 11 classes')
