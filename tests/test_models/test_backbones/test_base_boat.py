# Copyright (c) boat-mm contributors. All rights reserved.
"""What BaseBOATBackbone gives every family: the family registry and the
refusal of checkpoints that fit too few weights (naming the converter),
while the legitimate partial loads keep working."""
import copy
from collections import OrderedDict

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.model import ExponentialMovingAverage
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint

import boat_mm  # noqa: F401
from boat_mm.models.backbones import (BaseBOATBackbone, BOATCSWin, BOATSwin,
                                      boat_families, detect_boat_family)
from boat_mm.utils import PublishedCheckpointError

SWIN = dict(embed_dims=8, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 2))
CSWIN = dict(embed_dims=8, depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 2))
ARCHS = {BOATSwin: SWIN, BOATCSWin: CSWIN}
CONVERTER = 'python tools/model_converters/boat2mm.py SRC DST'


def test_families_registered_with_their_facts():
    assert {BOATSwin, BOATCSWin} <= set(boat_families())
    assert set(ARCHS) == set(boat_families())
    for family in boat_families():
        assert issubclass(family, BaseBOATBackbone)
        assert family.zoo_name(**family.arch_zoo['t']) == 'tiny'
        model = family(arch=ARCHS[family])
        # The accessor finds exactly the blocks the family's rule names.
        expected = [(i, j) for i, d in enumerate(model.depths)
                    for j in range(d) if family.has_fsla(i, j, 4)]
        assert list(model.fsla_modules()) == expected
        assert family(arch=ARCHS[family], with_fsla=False).fsla_modules() \
            == {}


def classifier(family, with_fsla=True):
    from mmpretrain.registry import MODELS
    width = ARCHS[family]['embed_dims'] * 8
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(
                    type=family.__name__,
                    arch=ARCHS[family],
                    with_fsla=with_fsla),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=3, in_channels=width)))


def published_files(tmp_path):
    """A published-layout file of each family: every key its layout maps
    (small stand-in tensors: recognising the layout needs the names), under
    the entries that the published files use."""
    paths = {}
    for i, family in enumerate(boat_families()):
        keys = family.published.key_map(
            dict(
                depths=ARCHS[family]['depths'], with_fsla=True, num_classes=3))
        path = str(tmp_path / f'{family.family}_published.pth')
        entry = ('model', 'state_dict')[i % 2]
        torch.save({
            entry: {
                k: torch.zeros(1)
                for k in keys
            },
            'epoch': 300
        }, path)
        paths[family] = path
    return paths


@pytest.mark.parametrize('family', boat_families())
@pytest.mark.parametrize('prefix', [None, 'backbone.'])
def test_pretrained_published_file_names_the_converter(tmp_path, family,
                                                       prefix):
    path = published_files(tmp_path)[family]
    cfg = dict(type='Pretrained', checkpoint=path)
    if prefix:
        cfg['prefix'] = prefix
    model = family(arch=ARCHS[family], init_cfg=cfg)
    with pytest.raises(ValueError) as err:
        model.init_weights()
    msg = str(err.value)
    assert CONVERTER in msg
    if isinstance(err.value, PublishedCheckpointError):
        # Recognised by the loader (a published layout with FSLA):
        # boat_mm.utils.published, tests/test_utils/test_published.py.
        assert f'is a published {family.published_name} checkpoint' in msg
        return
    assert f'matches 0 of the {len(model.state_dict())} weights' in msg
    assert f'laid out like a published {family.published.name}' in msg
    if prefix:
        assert "no keys under 'backbone.'" in msg


@pytest.mark.parametrize('family', boat_families())
def test_load_from_published_file_names_the_converter(tmp_path, family):
    """load_from: the runner loads the whole model with strict=False; the
    backbone sees the keys under its ``backbone.`` prefix: none."""
    path = published_files(tmp_path)[family]
    model = classifier(family)
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, path, map_location='cpu', strict=False)
    assert CONVERTER in str(err.value)
    if isinstance(err.value, PublishedCheckpointError):
        return  # recognised by the loader, see above
    assert "matches 0 of" in str(err.value)
    assert "no keys under 'backbone.'" in str(err.value)


@pytest.mark.parametrize('family', boat_families())
@pytest.mark.parametrize('outer', ['', 'module.'])
def test_published_weights_given_to_torch_are_named(family, outer):
    """Published weights given to the backbone's own ``load_state_dict``
    (no MMEngine loader to recognise the file), bare or as DataParallel
    saved them (``module.``), are named as published and sent to the
    converter."""
    keys = family.published.key_map(
        dict(depths=ARCHS[family]['depths'], with_fsla=True, num_classes=3))
    weights = {outer + k: torch.zeros(1) for k in keys}
    with pytest.raises(ValueError) as err:
        family(arch=ARCHS[family]).load_state_dict(weights, strict=False)
    msg = str(err.value)
    assert f'laid out like a published {family.published.name}' in msg, msg
    assert CONVERTER in msg


def test_unrelated_and_mostly_foreign_checkpoints_refused(tmp_path):
    # Another family's classifier: names overlap, shapes and blocks do not.
    other = classifier(BOATSwin).state_dict()
    path = str(tmp_path / 'swin_cls.pth')
    torch.save({'state_dict': other}, path)
    model = BOATCSWin(
        arch=CSWIN,
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    with pytest.raises(ValueError) as err:
        model.init_weights()
    total = len(model.state_dict())
    own = model.state_dict()
    # The count in the message, computed independently here.
    found = sum(k in {
        n[9:]: v
        for n, v in other.items()
    } and other['backbone.' + k].shape == v.shape for k, v in own.items())
    assert found < total / 2
    assert f'matches {found} of the {total} weights' in str(err.value)
    # A (BOAT-)Swin file: no conversion makes it a BOAT-CSWin's, so the
    # fix named is to load BOAT-CSWin weights instead.
    assert CONVERTER not in str(err.value)
    assert "Its keys are a Swin's" in str(err.value)
    assert 'load BOATCSWin weights' in str(err.value)
    assert 'laid out like a published' not in str(err.value)
    # Weights of no BOAT model at all.
    with pytest.raises(ValueError, match='matches 0 of'):
        BOATSwin(arch=SWIN).load_state_dict(
            {'conv1.weight': torch.zeros(4, 3, 3, 3)}, strict=False)


@pytest.mark.parametrize('family', boat_families())
def test_legitimate_loads_still_work(tmp_path, family):
    src = classifier(family)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    state = src.state_dict()
    path = str(tmp_path / 'cls.pth')
    torch.save({'state_dict': state, 'meta': {}}, path)

    # load_from / resume: the whole model.
    dst = classifier(family)
    load_checkpoint(dst, path, map_location='cpu', strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k

    # The classifier's backbone into a dense-prediction backbone (all four
    # outputs: norm0-2 are not in the file) through a prefix.
    backbone = family(
        arch=ARCHS[family],
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    backbone.init_weights()
    for k, v in backbone.state_dict().items():
        if not k.startswith(('norm0', 'norm1', 'norm2')):
            assert torch.equal(v, state['backbone.' + k]), k

    # EMA: MMEngine's averaged model holds the model under ``module.``.
    ema = ExponentialMovingAverage(classifier(family))
    ema_state = copy.deepcopy(ema.state_dict())
    ema_state.update(('module.' + k, v.clone()) for k, v in state.items())
    ema.load_state_dict(ema_state, strict=True)
    assert torch.equal(ema.module.backbone.norm3.weight,
                       state['backbone.norm3.weight'])

    # A plain Swin / CSWin checkpoint (no FSLA) into a BOAT model.
    plain = OrderedDict((k, v) for k, v in state.items()
                        if '.fsla.' not in k and '.norm_fsla.' not in k)
    missing, _ = classifier(family).load_state_dict(plain, strict=False)
    assert missing and all('fsla' in k for k in missing)


@pytest.mark.parametrize('family', boat_families())
def test_parts_of_a_model_load_with_strict_false(family):
    """torch's ``strict=False``: a head alone, or a stem alone, loads into
    a model that holds a BOAT backbone and leaves the rest as it was; a
    file with nothing for the backbone and keys no module takes (a
    backbone's file without its ``backbone.`` prefix) is still refused."""
    model = classifier(family)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    head = {
        k: torch.randn_like(v)
        for k, v in before.items() if k.startswith('head.')
    }
    missing, unexpected = model.load_state_dict(head, strict=False)
    assert head and not unexpected
    assert sorted(missing) == sorted(set(before) - set(head))
    stem = {
        k: torch.randn_like(v)
        for k, v in before.items() if k.startswith('backbone.patch_embed.')
    }
    assert model.load_state_dict(stem, strict=False).unexpected_keys == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, {**before, **head, **stem}[key]), key
    backbone_file = {
        k[len('backbone.'):]: v
        for k, v in before.items() if k.startswith('backbone.')
    }
    with pytest.raises(ValueError, match="matches 0 of .* no keys under"):
        model.load_state_dict(backbone_file, strict=False)


@pytest.mark.parametrize('family', boat_families())
def test_without_fsla_its_settings_meet_no_backbone_argument(family):
    """with_fsla=False checks fsla_cfg's own values (above), not against
    the backbone's drop rates, which no FSLA meets: the C++ attention (no
    dropout) with attn_drop_rate builds; a stage of a BOAT file loads."""
    args = dict(
        arch=ARCHS[family],
        with_fsla=False,
        attn_drop_rate=0.1,
        fsla_cfg=dict(attention_impl='cpp'))
    family.check_arguments(**args)
    model = family(**args)
    with pytest.raises(ValueError, match='has no attention dropout'):
        family(**dict(args, with_fsla=True))
    src = family(arch=ARCHS[family]).state_dict()
    stage = {k: v for k, v in src.items() if k.startswith('stages.0.')}
    result = model.load_state_dict(stage, strict=False)
    assert result.unexpected_keys and all('.fsla.' in k or '.norm_fsla.' in k
                                          for k in result.unexpected_keys)


def test_detect_boat_family_lists_what_it_looks_for():
    with pytest.raises(KeyError) as err:
        detect_boat_family({'conv1.weight': torch.zeros(1)})
    for family in boat_families():
        layout = family.published
        stem = f'{layout.stem[0]}.weight'
        assert f'{layout.name} ({layout.marker}* and {stem})' in str(err.value)
        assert detect_boat_family({
            layout.marker + 'x.weight': 0,
            stem: 0
        }) is family
        # The marker alone is another model's (mmseg's ViTs: layers.*).
        with pytest.raises(KeyError):
            detect_boat_family({layout.marker + 'x.weight': 0})


def test_pretrained_path_with_tilde_is_expanded(tmp_path, monkeypatch):
    # MMEngine's local loader expands '~'; the early file check must too.
    monkeypatch.setenv('HOME', str(tmp_path))
    src = BOATSwin(arch=SWIN)
    torch.save({'state_dict': src.state_dict()}, str(tmp_path / 'x.pth'))
    model = BOATSwin(
        arch=SWIN, init_cfg=dict(type='Pretrained', checkpoint='~/x.pth'))
    model.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    with pytest.raises(FileNotFoundError, match="'~/y.pth' not found"):
        BOATSwin(
            arch=SWIN, init_cfg=dict(type='Pretrained',
                                     checkpoint='~/y.pth')).init_weights()


@pytest.mark.parametrize(
    'path, how',
    [
        ('checkpoints/boat-swin-tiny_in1k.pth',
         'Convert the published BOAT weights with `python '
         'tools/model_converters/boat2mm.py SRC '
         'checkpoints/boat-swin-tiny_in1k.pth`, point init_cfg.checkpoint to '
         'an existing file'),
        # What a SimMIM fine-tuning config points to before the pre-training
        # ran.
        ('work_dirs/simmim_x/epoch_100.pth',
         'It is the checkpoint of a training run: train simmim_x first '
         '(`python tools/train.py CONFIG` writes work_dirs/CONFIG_NAME/), '
         'point init_cfg.checkpoint to an existing file (`--cfg-options '
         'model.backbone.init_cfg.checkpoint=FILE`)'),
        # The best checkpoint of a run; a run's file without its folder.
        ('runs/a/best_accuracy_top1_epoch_7.pth',
         'It is the checkpoint of a training run: train a first'),
        ('./iter_8000.pth',
         'It is the checkpoint of a training run: train that run first'),
    ])
def test_missing_pretrained_file_names_the_fix(path, how, tmp_path,
                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        BOATSwin(
            arch=SWIN,
            init_cfg=dict(
                type='Pretrained', checkpoint=path,
                prefix='backbone.')).init_weights()
    message = str(err.value)
    assert message.startswith(
        f'BOATSwin: pretrained checkpoint {path!r} not found. {how}')
    assert message.endswith(
        ', or set `model.backbone.init_cfg=None` to train from scratch.')
    assert ('boat2mm.py' in message) == path.startswith('checkpoints/')


@pytest.mark.parametrize('family', boat_families())
def test_mmseg_model_level_pretrained(tmp_path, family):
    """mmseg's EncoderDecoder sets ``backbone.pretrained``: as mmseg's
    Swin, it becomes a Pretrained init_cfg (with a warning) that loads."""
    from mmseg.registry import MODELS
    src = family(arch=ARCHS[family])
    path = str(tmp_path / 'backbone.pth')
    torch.save({'state_dict': src.state_dict()}, path)
    cfg = ConfigDict(
        type='EncoderDecoder',
        pretrained=path,
        backbone=dict(type=family.__name__, arch=ARCHS[family]),
        decode_head=dict(
            type='FCNHead',
            in_channels=ARCHS[family]['embed_dims'] * 8,
            in_index=3,
            channels=4,
            num_convs=1,
            num_classes=2))
    with DefaultScope.overwrite_default_scope('mmseg'):
        with pytest.warns(UserWarning, match='pretrained is deprecated'):
            model = MODELS.build(cfg)
    assert model.backbone.init_cfg == dict(type='Pretrained', checkpoint=path)
    model.backbone.init_weights()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    with pytest.raises(ValueError, match='cannot both be set'):
        family(
            arch=ARCHS[family],
            pretrained=path,
            init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(TypeError, match='pretrained must be a str'):
        family(arch=ARCHS[family], pretrained=True)
    # mmseg's ResNet bases: refused before a download.
    cfg.update(pretrained='open-mmlab://resnet50_v1c')
    cfg.backbone.pop('pretrained')  # set by the build above
    with DefaultScope.overwrite_default_scope('mmseg'), pytest.raises(
            ValueError,
            match=r"pretrained='open-mmlab://resnet50_v1c' names CNN weights "
            r".* set `model=dict\(pretrained=None\)`"):
        MODELS.build(cfg)


@pytest.mark.parametrize('family', boat_families())
def test_unknown_arguments_name_the_class_and_the_fix(family):
    name = family.__name__
    with pytest.raises(TypeError) as err:
        family(
            arch=ARCHS[family],
            norm_eval=True,
            strides=(4, 2, 2, 2),
            depths=(2, 2),
            foo=1)
    msg = str(err.value)
    assert 'BaseBOATBackbone' not in msg
    assert f"{name} got unexpected keyword arguments ['depths', " \
        "'foo', 'norm_eval', 'strides']" in msg
    assert f"SwinTransformer that {name} does not support: ['depths', " \
        "'norm_eval', 'strides']" in msg
    assert 'inside arch=dict(' in msg and '_delete_=True' in msg
    # Typos alone: no upstream hint, the accepted arguments listed.
    with pytest.raises(TypeError) as err:
        family(arch=ARCHS[family], drop_pth_rate=0.1)
    msg = str(err.value)
    assert "['drop_pth_rate']" in msg and 'upstream' not in msg
    assert "'drop_path_rate'" in msg.split(f'{name} takes')[1]
    assert 'Did you mean drop_path_rate for drop_pth_rate?' in msg


# Arguments the backbones refuse (each family, and SimMIM's variants).
BAD_ARGUMENTS = [
    dict(out_indices=(0, 1, 2, 4)),
    dict(out_indices=()),
    dict(drop_path_rate=1.5),
    dict(attn_drop_rate=-0.1),
    dict(with_cp=1),
    dict(with_fsla='False'),
    dict(frozen_stages=5),
    dict(frozen_stages=True),
    dict(norm_eval=True),
    dict(out_indice=(0, 1)),
    dict(arch='huge'),
    dict(arch=dict(embed_dims=8, depths=(1, 1), num_heads=(2, 3))),
    dict(qk_scale=0),
    dict(mlp_ratio=0),
    dict(in_channels=0),
    dict(fsla_cfg=dict(groupsize=4)),
    dict(fsla_cfg=dict(group_size=16)),  # the default overlap, 20
    dict(fsla_cfg=dict(kmeans_temperature=0)),
    dict(fsla_cfg=dict(clustering_impl='fast')),
    dict(pretrained=3),
    dict(pretrained='x.pth', init_cfg=dict(type='Pretrained')),
    dict(window_size=0),  # BOAT-Swin's own; an unknown one for BOAT-CSWin
    dict(patch_size=2.0),
    dict(norm_cfg=dict(type='BN')),
    dict(with_fsla=False, fsla_cfg=dict(kmeans_temperature=0)),
]


def _families_and_variants():
    from boat_mm.models.selfsup import SimMIMBOATCSWin, SimMIMBOATSwin
    family = {SimMIMBOATSwin: BOATSwin, SimMIMBOATCSWin: BOATCSWin}
    classes = list(boat_families()) + list(family)
    return [(c, ARCHS[family.get(c, c)]) for c in classes]


@pytest.mark.parametrize('bad', BAD_ARGUMENTS, ids=lambda b: str(list(b)))
@pytest.mark.parametrize(
    'cls, arch',
    _families_and_variants(),
    ids=lambda c: getattr(c, '__name__', ''))
def test_check_arguments_refuses_as_the_build(cls, arch, bad):
    """check_arguments, which the tools run on a config without building,
    refuses what building refuses, with the same error."""
    args = {'arch': arch, **bad}
    with pytest.raises((TypeError, ValueError)) as built:
        cls(**args)
    with pytest.raises(type(built.value)) as checked:
        cls.check_arguments(**args)
    assert str(checked.value) == str(built.value)


@pytest.mark.parametrize('cls, arch', _families_and_variants())
def test_check_arguments_passes_what_builds(cls, arch):
    args = dict(
        arch=arch,
        out_indices=(-1, 1),
        frozen_stages=2,
        drop_path_rate=0.3,
        with_cp=True,
        fsla_cfg=dict(group_size=4, overlap=1))
    model = cls(**args)
    settings = cls.check_arguments(**args)
    assert settings['out_indices'] == model.out_indices == (1, 3)
    assert settings['fsla_cfg'] == model.fsla_cfg
    assert settings['fsla_cfg']['group_size'] == 4
    assert settings['arch_settings'] == model.arch_settings


@pytest.mark.parametrize('family', boat_families())
def test_qk_scale_zero_or_negative_refused(family):
    # The window attention would read 0 as the default, FSLA and the
    # stripe attention as 0 (uniform attention): one meaning, refused.
    for scale in (0., -0.5):
        with pytest.raises(ValueError) as err:
            family(arch=ARCHS[family], qk_scale=scale)
        assert family.__name__ in str(err.value)
        assert 'qk_scale=None for the default' in str(err.value)
    with pytest.raises(ValueError, match='qk_scale=None for the default'):
        family(arch=ARCHS[family], fsla_cfg=dict(qk_scale=0))
    model = family(
        arch=ARCHS[family], qk_scale=0.5, fsla_cfg=dict(qk_scale=0.25))
    assert {m.scale for m in model.fsla_modules().values()} == {0.25}


def arch(**kwargs) -> dict:
    return dict(
        dict(embed_dims=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2)),
        **kwargs)


# Each bad value, the error type and what the message must say; before
# these checks most failed deep inside the layers (or built a model: a
# string with_fsla='no' is truthy, mlp_ratio='4' tried to allocate ~284 PB).
BAD_ARGUMENTS = [
    (dict(in_channels=0), ValueError, 'in_channels must be an int >= 1'),
    (dict(in_channels=3.0), TypeError, 'in_channels must be an int'),
    (dict(mlp_ratio='4'), TypeError, 'mlp_ratio must be a positive number'),
    (dict(mlp_ratio=0), ValueError, 'mlp_ratio must be a positive number'),
    (dict(out_indices='all'), TypeError, 'sequence of ints'),
    (dict(out_indices=None), TypeError, 'sequence of ints'),
    (dict(with_fsla='no'), TypeError, 'with_fsla must be True or False'),
    (dict(with_cp='x'), TypeError, 'with_cp must be True or False'),
    (dict(qkv_bias='yes'), TypeError, 'qkv_bias must be True or False'),
    (dict(qk_scale='1'), TypeError, 'qk_scale must be a positive number'),
    (dict(drop_path_rate=1.5), ValueError, r'drop_path_rate must be in \[0'),
    (dict(drop_path_rate=-0.1), ValueError, r'drop_path_rate must be in'),
    (dict(attn_drop_rate=-0.1), ValueError, r'attn_drop_rate must be in'),
    (dict(drop_rate=2.), ValueError, r'drop_rate must be in'),
    (dict(drop_rate='0.1'), TypeError,
     r"drop_rate must be a float in \[0, 1\], got '0.1' \(str\)"),
    (dict(out_indices=()), ValueError,
     r'^(BOATSwin|BOATCSWin): out_indices must name at least one stage, '
     r'e\.g\. '
     r'\(0, 1, 2, 3\) '
     r'or -1 for the last, got \(\)\.$'),
    (dict(frozen_stages=1.5), TypeError, 'frozen_stages must be an int'),
    (dict(fsla_cfg='x'), TypeError,
     '^(BOATSwin|BOATCSWin): fsla_cfg must be a dict'),
    (dict(fsla_cfg=dict(groupsize=16)), TypeError,
     r"^(BOATSwin|BOATCSWin): fsla_cfg has keys that "
     r"FeatureSpaceLocalAttention does not take: "
     r"\['groupsize'\] \(did you mean group_size for groupsize\?\)\. It "
     r"takes \[.*'group_size'"),
    (dict(fsla_cfg=dict(type='FeatureSpaceLocalAttention')), TypeError,
     r"\['type'\]; fsla_cfg holds its arguments, not a module config: drop "
     r"'type'\."),
    (dict(fsla_cfg=dict(group_size=16)), ValueError,
     r'^(BOATSwin|BOATCSWin): fsla_cfg, in stage 0: overlap \(20\) must be '
     r'>= 0 and smaller than group_size \(16\); lower overlap \(it defaults '
     r'to 20'),
    (dict(arch=arch(depths=(2, 2, 2), num_heads=(2, 2, 2))), ValueError,
     r'^(BOATSwin|BOATCSWin): out_indices \(0, 1, 2, 3\) must index one of '
     r'the 3 '
     r'stages; 3 is out of range \(e\.g\. out_indices=\(0, 1, 2\), or -1 '
     r'for the last\)'),
    (dict(fsla_cfg=dict(group_size=4.5)), TypeError, 'group_size must be'),
    (dict(fsla_cfg=dict(kmeans_temperature=0)), ValueError,
     'kmeans_temperature must be a positive number'),
    (dict(arch=arch(depths=(2, -1, 1, 1))), ValueError,
     'depths must be a list or tuple of one positive int per stage'),
    (dict(arch=arch(depths=2)), ValueError, 'depths must be a list or tuple'),
    (dict(arch=arch(num_heads=(2, 0, 2, 2))), ValueError,
     'num_heads must be a list or tuple of one positive int per stage'),
    (dict(arch=arch(embed_dims=8.0)), ValueError,
     'embed_dims must be a positive int or one positive width per stage'),
    (dict(arch=arch(embed_dims=[8, 16, 32, 64.5])), ValueError,
     'embed_dims must be a positive int'),
    # Norms of dimension 1 used to build, then fail at the first forward.
    (dict(norm_cfg=dict(type='BN')), ValueError,
     r"norm_cfg=\{'type': 'BN'\} cannot normalise the \(B, N, C\) tokens "
     r"of the blocks \(ValueError: expected 4D input \(got 3D input\)\); "
     r"use a norm over the last dimension, e\.g\. dict\(type='LN'\)\.$"),
    (dict(norm_cfg=dict(type='BN1d')), ValueError, 'cannot normalise'),
    (dict(norm_cfg=dict(type='GN', num_groups=1)), ValueError,
     'cannot normalise'),
    (dict(norm_cfg=dict(type='GN', num_groups=32)), ValueError,
     'cannot normalise'),
    (dict(norm_cfg=dict(type='GN')), ValueError,
     r"norm_cfg=\{'type': 'GN'\} does not build a norm layer"),
    # Shapes pass, but the tokens are normalised together.
    (dict(norm_cfg=dict(type='IN')), ValueError,
     r'normalises the \(B, N, C\) tokens of the blocks together'),
    (dict(norm_cfg='LN'), TypeError,
     r"norm_cfg must be a dict with a 'type', e\.g\. dict\(type='LN'\), "
     r"got 'LN'\.$"),
    # Without FSLA too: a config that turns it off keeps the value.
    (dict(with_fsla=False, fsla_cfg=dict(group_size=16)), ValueError,
     r'overlap \(20\) must be >= 0 and smaller than group_size \(16\)'),
    (dict(norm_cfg=dict(type='NoSuchNorm')), ValueError,
     r"norm_cfg type 'NoSuchNorm' is not a registered norm layer"),
]


@pytest.mark.parametrize('family', boat_families())
@pytest.mark.parametrize('kwargs, error, match', BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(family, kwargs, error, match):
    kwargs = dict(dict(arch=ARCHS[family]), **kwargs)
    with pytest.raises(error, match=match):
        family(**kwargs)


@pytest.mark.parametrize('family', boat_families())
def test_norm_cfg_reaches_every_norm(family):
    """A norm over the last dimension other than the default builds, and
    every norm of the backbone (stem, blocks, merges, outputs) is it."""
    model = family(arch=ARCHS[family], norm_cfg=dict(type='LN', eps=1e-3))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) > 2 * sum(model.depths)
    assert {m.eps for m in norms} == {1e-3}
    default = family(arch=ARCHS[family])
    assert len(norms) == sum(
        isinstance(m, torch.nn.LayerNorm) for m in default.modules())


# Custom arch dicts that cannot build a backbone, for every family: the
# one-line error names the key and what it needs. Each entry: (arch,
# error type, the message's tail or a part that names the fix).
BAD_ARCHS = [
    (dict(embed_dims=8, depths=(1, 1)), ValueError,
     r"arch misses keys \['num_heads'\]; it needs \['depths', "
     r"'embed_dims', 'num_heads'\]\.$"),
    (dict(embed_dims=8,
          num_heads=(2, 2)), ValueError, r"arch misses keys \['depths'\]"),
    (arch(num_heads=(2, 2)), ValueError,
     r'arch: depths, num_heads(, split_sizes)? need one entry per stage '
     r'\(4, as depths\), got depths=\(1, 1, 1, 1\), '
     r'num_heads=\(2, 2\)'),
    (arch(embed_dims=[8, 16]), ValueError,
     r'embed_dims must be a positive int or one positive width per stage '
     r'\(4\), got \[8, 16\]\.$'),
    (arch(depths=()), ValueError,
     r'depths must give the blocks of at least one stage, e\.g\. '
     r'depths=\(2, 2, 6, 2\), got \(\)\.$'),
    (arch(depths=(1, 1.5, 1, 1)), ValueError,
     r'depths must be a list or tuple of one positive int per stage, got '
     r'\(1, 1\.5, 1, 1\)\.$'),
    (arch(num_heads=(2, '2', 2, 2)), ValueError,
     r'num_heads must be a list or tuple of one positive int per stage'),
    (arch(num_heads=2), ValueError,
     r'num_heads must be a list or tuple of one positive int per stage, '
     r'got 2\.$'),
    (arch(depths=(1, True, 1, 1)), ValueError, 'depths must be a list'),
    # True is an int to Python: it would give widths 1, 2, 4, 8.
    (arch(embed_dims=True), ValueError, 'embed_dims must be a positive int'),
    (arch(embed_dims=(8, 16, 32, 0)), ValueError,
     'embed_dims must be a positive int'),
    (arch(embed_dims=12, num_heads=(8, 8, 8, 8)), ValueError,
     r'stage 0 has 12 channels, not divisible by its 8 heads\.$'),
    (arch(mlp_ratio=4), ValueError, r": unknown keys \['mlp_ratio'\]"),
    (5, TypeError, r": arch must be a name of \['b', 'base', 's', 'small', "
     r"'t', 'tiny'\] or a dict with keys \['depths', 'embed_dims', "
     r"'num_heads'\], got 5 \(int\)\.$"),
    ('huge', ValueError, r": unknown arch 'huge'; choose one of "
     r"\['b', 'base', 's', 'small', 't', 'tiny'\] or pass a dict"),
]


@pytest.mark.parametrize('family', boat_families())
@pytest.mark.parametrize('bad, error, match', BAD_ARCHS)
def test_bad_arch_dict_names_the_key_and_the_fix(family, bad, error, match):
    with pytest.raises(error, match=match) as err:
        family(arch=bad)
    assert str(err.value).startswith(family.__name__)
    assert '\n' not in str(err.value)


def test_cswin_split_sizes_checked_like_the_other_stage_lists():
    with pytest.raises(
            ValueError,
            match='depths, num_heads, split_sizes '
            r'need one entry per stage \(4, as depths\)'):
        BOATCSWin(arch=dict(CSWIN, split_sizes=(1, 2, 7)))
    with pytest.raises(
            ValueError,
            match='split_sizes must be a list or '
            'tuple of one positive int per stage, got 7'):
        BOATCSWin(arch=dict(CSWIN, split_sizes=7))
    with pytest.raises(ValueError, match='split_sizes must be a list'):
        BOATCSWin(arch=dict(CSWIN, split_sizes=(1, 2, 0, 7)))
    with pytest.raises(
            ValueError,
            match=r"^BOATSwin: unknown keys \['split_sizes'\] "
            r"in the arch dict; it takes \['depths', "
            r"'embed_dims', 'num_heads'\]\.$"):
        BOATSwin(arch=dict(SWIN, split_sizes=(1, 2, 7, 7)))


@pytest.mark.parametrize('depths', [(1, 1, 1, 1), (1, 1, 1, 2), (3, )])
def test_swin_arch_without_fsla_blocks_refused(depths):
    """BOAT-Swin puts FSLA in the odd blocks of the stages before the last:
    an arch without such a block would build a plain Swin unnoticed (the
    tiny archs of the tests once did)."""
    custom = dict(embed_dims=8, depths=depths, num_heads=(2, ) * len(depths))
    with pytest.raises(ValueError) as err:
        BOATSwin(arch=custom)
    assert str(err.value) == (
        f'BOATSwin arch with depths {list(depths)} has no block where '
        f'BOATSwin puts FSLA (the odd, shifted blocks of every stage but '
        f'the last: a stage before the last needs 2 or more blocks): give '
        f'it such blocks, or pass with_fsla=False for a model without '
        f'FSLA.')
    # The plain model, asked for, builds; one block 1 before the last
    # stage is enough for FSLA.
    plain = BOATSwin(arch=custom, with_fsla=False, out_indices=-1)
    assert plain.fsla_modules() == {}
    if len(depths) > 1:
        placed = BOATSwin(arch=dict(custom, depths=(2, ) + depths[1:]))
        assert list(placed.fsla_modules()) == [(0, 1)]


def test_swin_window_and_patch_size_must_be_positive_ints():
    for arg in ('window_size', 'patch_size'):
        with pytest.raises(TypeError, match=f'{arg} must be an int >= 1'):
            BOATSwin(arch=SWIN, **{arg: 7.5})
        with pytest.raises(ValueError, match=f'{arg} must be an int >= 1'):
            BOATSwin(arch=SWIN, **{arg: 0})


@pytest.mark.parametrize('family', boat_families())
def test_input_dtype_other_than_the_weights_names_the_fix(family):
    model = family(arch=ARCHS[family]).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match=r'x.to\(torch.bfloat16\)'):
        model(x)
    # Under autocast the stem casts the images itself.
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    with torch.no_grad():
        cast = model(x.bfloat16())
    for a, b in zip(out, cast):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r'images: cast the images, x.to\('):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_has_fsla_must_be_static():
    """Where FSLA sits is read from the class before any instance exists
    (the tools' argument check), so an instance method is refused when
    the subclass is defined, naming the fix, not at the first build with
    a missing-argument TypeError."""
    with pytest.raises(
            TypeError,
            match=r'Placed\.has_fsla must be a @staticmethod \(or '
            r'@classmethod\) of \(stage, block, num_stages\)'):

        class Placed(BOATSwin):

            def has_fsla(self, stage, block, num_stages):
                return stage == 0

    class Static(BOATSwin):

        @staticmethod
        def has_fsla(stage, block, num_stages):
            return stage == 0

    class FromClass(BOATSwin):
        stages_with_fsla = (0, )

        @classmethod
        def has_fsla(cls, stage, block, num_stages):
            return stage in cls.stages_with_fsla

    arch = dict(embed_dims=16, depths=(2, 2), num_heads=(1, 2))
    for family in (Static, FromClass):
        model = family(arch=arch, out_indices=(1, ))
        assert [[hasattr(b, 'fsla') for b in stage.blocks]
                for stage in model.stages] == [[True, True], [False, False]]
