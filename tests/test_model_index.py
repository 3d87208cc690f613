# Copyright (c) boat-mm contributors. All rights reserved.
"""The BOAT ImageNet models by name in mmpretrain's model hub
(boat_mm.model_index), and the post-import hook that registers them
without ``import boat_mm`` importing mmpretrain."""
import sys

import pytest
import torch
from mmengine.registry import DefaultScope
from published_files import NUM_CLASSES, classifier, write_published_cswin
from repo_scripts import REPO, load_script

import boat_mm
from boat_mm.utils import when_imported

CLASSIFIERS = sorted([
    'boat-cswin-base_8xb128_in1k',
    'boat-cswin-small_8xb256_in1k',
    'boat-cswin-tiny_8xb256_in1k',
    'boat-swin-base_16xb64_in1k',
    'boat-swin-small_16xb64_in1k',
    'boat-swin-tiny_16xb64_in1k',
    # Fine-tuned from SimMIM, at 192 and 224 px.
    'boat-cswin-base_simmim-100e-pre_8xb256-coslr-100e_in1k-192px',
    'boat-cswin-base_simmim-100e-pre_8xb256-coslr-100e_in1k',
    'boat-swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px',
    'boat-swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k'
])
SIMMIM = [
    'simmim_boat-cswin-base_8xb256-amp-coslr-100e_in1k-192px',
    'simmim_boat-swin-base-w6_8xb256-amp-coslr-100e_in1k-192px'
]
MODELS = sorted(CLASSIFIERS + SIMMIM)


def test_list_models_by_metafile_names():
    import mmpretrain
    assert sorted(mmpretrain.list_models('*boat*')) == MODELS
    # Explicit registration is idempotent and names the same models.
    assert sorted(boat_mm.register_model_index()) == MODELS
    assert sorted(mmpretrain.list_models('*boat*')) == MODELS
    from mmpretrain.apis.model import ModelHub
    info = ModelHub.get('boat-cswin-tiny_8xb256_in1k')
    assert info.data['Converted From']['Weights'] == (
        'https://www.dropbox.com/s/rsmtu6r0v2lt0y5/cswin_tiny.pth.tar?dl=0')
    # The published file is not ours to load: the hub's weights raise.
    assert info.weights == 'boat-mm-unconverted://boat-cswin-tiny_8xb256_in1k'
    assert info.config.model.backbone.type == 'BOATCSWin'


def _tiny_arch(depths: list, num_heads: list) -> dict:
    """An arch of width 8 that replaces a config's, for ``get_model``."""
    return dict(
        _delete_=True, embed_dims=8, depths=depths, num_heads=num_heads)


def _tiny_swin() -> dict:
    return _tiny_arch([2, 1, 1, 1], [1] * 4)  # FSLA in block 1 of stage 0


def test_get_model_pretrained_true_names_the_converter():
    from mmpretrain import get_model
    name = 'boat-swin-tiny_16xb64_in1k'
    # Not mmpretrain's generic warning and a randomly initialised model.
    with pytest.raises(FileNotFoundError) as err:
        # A tiny arch: the model is built before loading.
        get_model(name, pretrained=True, backbone=dict(arch=_tiny_swin()))
    msg = str(err.value)
    assert f'{name} has no weights of its own' in msg
    assert ('tools/model_converters/boat2mm.py SRC DST` (SRC: that URL or '
            'the downloaded file)') in msg
    assert 'pretrained=DST' in msg
    assert 'https://www.dropbox.com/s/xa94uewsrvjglnn/tiny.pth' in msg


def test_models_without_published_weights_say_how_to_train_them():
    """A SimMIM model (and the classifiers that fine-tune it) has no
    published weights: ``pretrained=True`` names its config and the
    training command; ``pretrained=False`` builds it."""
    from mmpretrain import get_model
    name = SIMMIM[0]

    def tiny():  # get_model consumes the _delete_ of its dicts
        return dict(
            backbone=dict(arch=_tiny_arch([1, 1, 1, 1], [2] * 4)),
            neck=dict(in_channels=64))

    with pytest.raises(FileNotFoundError) as err:
        get_model(name, pretrained=True, **tiny())
    assert str(err.value) == (
        f'{name} has no weights in mmpretrain\'s model hub, and none are '
        f'published: train it with `python tools/train.py '
        f'configs/boat_cswin/{name}.py`, then call get_model({name!r}, '
        f'pretrained=WORK_DIR/epoch_N.pth); pretrained=False builds it '
        f'randomly initialised.')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = get_model(name, pretrained=False, **tiny())
    assert type(model).__name__ == 'SimMIM'
    assert type(model.backbone).__name__ == 'SimMIMBOATCSWin'


def test_fine_tuned_models_name_their_pre_training():
    """A classifier fine-tuned from a SimMIM model: pretrained=True names
    its training and, first, that of the SimMIM model it starts from."""
    from mmpretrain import get_model
    name = 'boat-swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k'
    pre = 'simmim_boat-swin-base-w6_8xb256-amp-coslr-100e_in1k-192px'
    with pytest.raises(FileNotFoundError) as err:
        get_model(
            name,
            pretrained=True,
            backbone=dict(arch=_tiny_swin(), init_cfg=None),
            head=dict(in_channels=64))
    assert str(err.value) == (
        f'{name} has no weights in mmpretrain\'s model hub, and none are '
        f'published: train it with `python tools/train.py '
        f'configs/boat_swin/{name}.py` after `python tools/train.py '
        f'configs/boat_swin/{pre}.py`, whose work_dirs/{pre}/epoch_100.pth '
        f'its backbone starts from, then call get_model({name!r}, '
        f'pretrained=WORK_DIR/epoch_N.pth); pretrained=False builds it '
        f'randomly initialised.')


def test_inference_model_by_name():
    """mmpretrain picks the inferencer by the metafile's Task: every BOAT
    classifier declares Image Classification (metrics or not)."""
    import mmpretrain
    assert sorted(
        mmpretrain.list_models('*boat*',
                               task='Image Classification')) == CLASSIFIERS
    torch.manual_seed(0)
    img = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy()
    # Random weights (the hub has no converted ones): the model at 224.
    # (In mmpretrain's scope: another test's may still be the default.)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        result = mmpretrain.inference_model(
            'boat-swin-tiny_16xb64_in1k', img, pretrained=False)
    scores = result['pred_scores']
    assert scores.shape == (1000, )
    assert abs(float(scores.sum()) - 1) < 1e-4
    assert result['pred_label'] == int(scores.argmax())
    assert result['pred_class'] == mmpretrain.datasets.ImageNet.METAINFO[
        'classes'][result['pred_label']]


def test_get_model_by_name_loads_a_converted_file(tmp_path):
    from mmpretrain import get_model

    from boat_mm.models.backbones import detect_boat_family
    from boat_mm.models.utils.ckpt_convert import pick_boat_weights
    from boat_mm.utils.published import load_published_checkpoint
    src = write_published_cswin(str(tmp_path / 'cswin_tiny.pth.tar'))[0]
    dst = str(tmp_path / 'boat-cswin-tiny_in1k.pth')
    # What tools/model_converters/boat2mm.py writes, from the package API.
    _, weights = pick_boat_weights(load_published_checkpoint(src)[0], False)
    family = detect_boat_family(weights)
    torch.save(dict(state_dict=family.published.convert(weights)), dst)
    model = get_model(
        'boat-cswin-tiny_8xb256_in1k',
        pretrained=dst,
        head=dict(num_classes=NUM_CLASSES))
    expected = torch.load(dst, weights_only=True)['state_dict']
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_get_model_by_name_loads_what_boat2mm_writes(tmp_path, monkeypatch):
    """tools/model_converters/boat2mm.py on a published-layout BOAT-CSWin-T
    file of random weights: the file it writes, loaded by name, gives the
    logits of the converter's own strict load, and both those of the
    classifier the published file was laid out from."""
    from mmpretrain import get_model
    torch.manual_seed(0)
    source = classifier(dict(type='BOATCSWin', arch='tiny'), NUM_CLASSES,
                        512).eval()
    src = write_published_cswin(
        str(tmp_path / 'cswin_tiny.pth.tar'), source.state_dict())[0]
    dst = str(tmp_path / 'boat-cswin-tiny_in1k.pth')

    monkeypatch.setattr(sys, 'path', list(sys.path))  # the tool adds tools/
    tool = load_script('tools/model_converters/boat2mm.py')
    strict_loads = []
    check_loads = tool.check_loads

    def record(model, state_dict):
        check_loads(model, state_dict)
        strict_loads.append(model)

    monkeypatch.setattr(tool, 'check_loads', record)
    assert tool.main([src, dst]) == 0
    assert len(strict_loads) == 1

    model = get_model(
        'boat-cswin-tiny_8xb256_in1k',
        pretrained=dst,
        head=dict(num_classes=NUM_CLASSES)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x, mode='tensor')
        converter = strict_loads[0].eval()(x, mode='tensor')
        expected = source(x, mode='tensor')
    assert got.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(got, converter, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.std() > 0.1  # not a degenerate model


def test_when_imported_runs_after_the_first_import(tmp_path, monkeypatch):
    (tmp_path / 'boat_probe_mod.py').write_text('VALUE = 42\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported('boat_probe_mod', lambda m: seen.append(m.VALUE))
    assert seen == [] and 'boat_probe_mod' not in sys.modules
    import boat_probe_mod  # noqa: F401
    assert seen == [42]
    import boat_probe_mod  # noqa: F401,F811  (no second call)
    assert seen == [42]
    # Already imported: called at once.
    when_imported('boat_probe_mod', lambda m: seen.append(-m.VALUE))
    assert seen == [42, -42]
    del sys.modules['boat_probe_mod']


def test_registration_in_a_fresh_process():
    """boat_mm imported first, mmpretrain later (the in-process tests
    cover mmpretrain imported first)."""
    import subprocess
    code = ('import boat_mm, mmpretrain; '
            'print(sorted(mmpretrain.list_models("*boat*")))')
    out = subprocess.run([sys.executable, '-W', 'ignore', '-c', code],
                         capture_output=True,
                         text=True,
                         cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(MODELS)
