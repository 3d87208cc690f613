# Copyright (c) boat-mm contributors. All rights reserved.
"""Checkpoint converters on every key, against inverses written here.

* The BOAT-CSWin converter: our classifier's state dict, with a distinct
  value range per tensor (so that two same-shaped tensors swapped, e.g.
  ``norm1`` and ``norm2``, differ), is laid out like a published file by
  :func:`published_files.cswin_to_original` (written from docs/fsla.md
  section 6) and must convert back exactly, key by key.
* ``tools/model_converters/boat2mm.py``'s ``main`` (what the command
  runs; test_boat2mm.py runs the command line) on a BOAT-CSWin
  file (its ``state_dict``, and its ``state_dict_ema`` with ``--ema``) and
  on a BOAT-Swin file (the inverse of test_boat_swin.py): the written
  checkpoint must equal our state dict on every key.

* A timm Swin (made by timm at tiny size) converts to our classifier
  without FSLA, which computes timm's logits; a CSWin file with EMA
  weights alone converts.

The CSWin command runs on the published tiny arch (the tool refuses
custom CSWin archs: head counts leave no trace in the weights); its
tensors are stored as one broadcast number each, so the file stays tiny.
"""
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from published_files import classifier, cswin_to_original
from repo_scripts import REPO, load_script

import boat_mm  # noqa: F401
from boat_mm.models.backbones import BOATCSWin

TOOL = osp.join(REPO, 'tools', 'model_converters', 'boat2mm.py')


def distinct_state(model: torch.nn.Module) -> 'OrderedDict[str, torch.Tensor]':
    """State dict whose tensor ``i`` holds values in ``[i, i + 0.5)``."""
    gen = torch.Generator().manual_seed(0)
    return OrderedDict((k, i + 0.5 * torch.rand(v.shape, generator=gen))
                       for i, (k, v) in enumerate(model.state_dict().items()))


@pytest.mark.parametrize('with_fsla', [True, False])
def test_cswin_converter_inverts_on_every_key(with_fsla):
    arch = dict(embed_dims=16, depths=[2, 2, 3, 2], num_heads=[2, 2, 4, 4])
    model = classifier(
        dict(type='BOATCSWin', arch=arch, with_fsla=with_fsla), 7, 128)
    ours = distinct_state(model)
    converted = BOATCSWin.published.convert(cswin_to_original(ours))
    assert set(converted) == set(ours)
    for key, value in ours.items():
        assert torch.equal(converted[key], value), key
    model.load_state_dict(converted, strict=True)


def _run_tool(capsys, *args: str) -> str:
    """The command's ``main`` on ``args``, in this process (the command
    line itself runs as a subprocess in test_boat2mm.py); its output."""
    capsys.readouterr()
    assert load_script(TOOL, 'boat2mm_cmd').main(list(args)) == 0
    return capsys.readouterr().out


def _load(path: str) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def cswin_tiny_file(tmp_path_factory):
    """A published-layout BOAT-CSWin-T file; tensor ``i`` of our state dict
    is the number ``i`` in ``state_dict`` and ``i + 0.5`` in
    ``state_dict_ema`` (broadcast, one stored number each)."""
    model = classifier(dict(type='BOATCSWin', arch='tiny'), 11, 512)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    del model

    def layout(offset: float) -> OrderedDict:
        ours = OrderedDict((k, torch.tensor(i + offset).expand(shape))
                           for i, (k, shape) in enumerate(shapes.items()))
        # timm's saver under DataParallel: a 'module.' prefix.
        return OrderedDict(
            ('module.' + k, v) for k, v in cswin_to_original(ours).items())

    path = str(tmp_path_factory.mktemp('cswin') / 'cswin_tiny.pth.tar')
    torch.save(
        dict(state_dict=layout(0.), state_dict_ema=layout(0.5), epoch=299),
        path)
    return path, shapes


@pytest.mark.parametrize('ema', [False, True])
def test_boat2mm_command_on_cswin_file(cswin_tiny_file, tmp_path, ema, capsys):
    src, shapes = cswin_tiny_file
    dst = str(tmp_path / 'out.pth')
    out = _run_tool(capsys, src, dst, *(['--ema'] if ema else []))
    assert 'BOAT-CSWin, arch tiny' in out
    ckpt = _load(dst)
    assert ckpt['meta']['family'] == 'cswin' and ckpt['meta']['ema'] == ema
    # What publish_model.py reads to say where the weights came from.
    assert ckpt['meta']['source'] == 'cswin_tiny.pth.tar'
    assert ckpt['meta']['source_key'] == ('state_dict_ema'
                                          if ema else 'state_dict')
    assert ckpt['meta']['backbone']['type'] == 'BOATCSWin'
    state = ckpt['state_dict']
    assert list(state) == list(shapes)
    offset = 0.5 if ema else 0.
    for i, (key, shape) in enumerate(shapes.items()):
        value = state[key]
        assert value.shape == shape, key
        assert bool((value == i + offset).all()), key


def test_boat2mm_command_on_swin_file(tmp_path, capsys):
    """The inverse of test_boat_swin.py (our layout -> published, Swin's
    merging order included), through the command and back."""
    swin_tests = load_script(
        'tests/test_models/test_backbones/test_boat_swin.py')
    model = classifier(dict(type='BOATSwin', arch=swin_tests.TINY), 10, 192)
    ours = distinct_state(model)
    src, dst = str(tmp_path / 'swin.pth'), str(tmp_path / 'out.pth')
    torch.save(dict(model=swin_tests.to_original(ours)), src)
    out = _run_tool(capsys, src, dst)
    assert 'BOAT-Swin, arch custom' in out
    ckpt = _load(dst)
    assert ckpt['meta']['family'] == 'swin'
    assert ckpt['meta']['backbone']['type'] == 'BOATSwin'
    state = ckpt['state_dict']
    assert set(state) == set(ours)
    for key, value in ours.items():
        assert torch.equal(state[key], value), key


def test_boat2mm_converts_timm_swin_to_the_same_model(tmp_path, capsys):
    """timm's Swin layout (merges stored with the stage they feed,
    ``head.fc``), made by timm's SwinTransformer at tiny size: refused
    as is with a message naming the converter; boat2mm converts it, and
    our classifier without FSLA computes timm's logits."""
    pytest.importorskip('timm')
    from timm.models.swin_transformer import SwinTransformer

    from boat_mm.models import BOATSwin
    from boat_mm.models.backbones import CheckpointMismatchError
    torch.manual_seed(0)
    ref = SwinTransformer(
        embed_dim=24,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        num_classes=7).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():  # norms too: merge orders show
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    src, dst = str(tmp_path / 'timm_swin.pth'), str(tmp_path / 'out.pth')
    torch.save(ref.state_dict(), src)
    arch = dict(embed_dims=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
    with pytest.raises(CheckpointMismatchError, match='boat2mm') as err:
        BOATSwin(
            arch=arch, init_cfg=dict(type='Pretrained',
                                     checkpoint=src)).init_weights()
    assert 'Swin (official or timm)' in str(err.value)

    tool = load_script(TOOL, 'boat2mm_timm')
    meta = tool.convert(src, dst)
    assert 'Swin (official or timm) (for BOAT-Swin)' in capsys.readouterr().out
    assert meta['backbone']['with_fsla'] is False
    model = classifier(
        dict(type='BOATSwin', arch=arch, with_fsla=False), 7, 192).eval()
    model.load_state_dict(_load(dst)['state_dict'], strict=True)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, mode='tensor'), ref(x), atol=1e-4, rtol=1e-4)

    # timm's weights on the Hugging Face hub are safetensors files.
    from safetensors.torch import save_file
    src = str(tmp_path / 'model.safetensors')
    save_file(ref.state_dict(), src)
    tool.convert(src, str(tmp_path / 'out2.pth'))
    again = _load(str(tmp_path / 'out2.pth'))['state_dict']
    for key, value in _load(dst)['state_dict'].items():
        assert torch.equal(again[key], value), key


def test_safetensors_files_are_told_from_torch_files(tmp_path):
    """boat2mm reads safetensors files (timm's on the Hugging Face hub)
    with the safetensors package; it tells them from torch.save files
    (zip or legacy pickle) by the format's little-endian header size."""
    from safetensors.torch import save_file
    tool = load_script(TOOL, 'boat2mm_format')
    weights = {'w': torch.arange(6.).view(2, 3)}
    save_file(weights, str(tmp_path / 'w.safetensors'))
    torch.save(weights, str(tmp_path / 'w.pth'))
    torch.save(
        weights,
        str(tmp_path / 'legacy.pth'),
        _use_new_zipfile_serialization=False)
    assert tool.is_safetensors(str(tmp_path / 'w.safetensors'))
    assert not tool.is_safetensors(str(tmp_path / 'w.pth'))
    assert not tool.is_safetensors(str(tmp_path / 'legacy.pth'))


def test_cswin_file_with_ema_weights_only():
    """A CSWin file holding ``state_dict_ema`` alone (as some CSWin
    releases) converts without --ema."""
    from boat_mm.models.backbones import convert_boat_checkpoint
    arch = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4])
    ours = distinct_state(
        classifier(dict(type='BOATCSWin', arch=arch, with_fsla=False), 3, 128))
    family, converted = convert_boat_checkpoint(
        dict(state_dict_ema=cswin_to_original(ours)))
    assert family is BOATCSWin
    assert list(converted) == list(ours)


def test_cswin_file_with_training_args_is_named_as_cswin(tmp_path):
    """A CSWin file pickling timm's training ``args`` (weights-only loading
    refuses it): the message names a CSWin checkpoint, not a BOAT one, and
    the converter."""
    import argparse

    from boat_mm.utils.published import CONVERTER, PublishedCheckpointError
    arch = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4])
    ours = distinct_state(
        classifier(dict(type='BOATCSWin', arch=arch, with_fsla=False), 3, 128))
    path = str(tmp_path / 'cswin.pth')
    torch.save(
        dict(
            state_dict=cswin_to_original(ours),
            args=argparse.Namespace(model='CSWin_64_12211_tiny_224')), path)
    model = BOATCSWin(
        arch=arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(PublishedCheckpointError) as err:
        model.init_weights()
    assert 'a CSWin (official) checkpoint (no FSLA, arch' in str(err.value)
    assert CONVERTER in str(err.value)
