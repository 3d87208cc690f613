# Copyright (c) boat-mm contributors. All rights reserved.
"""tools/model_converters/boat2mm.py on a synthetic checkpoint laid out like
the published BOAT-Swin files (tiny custom arch)."""
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.registry import DefaultScope
from repo_scripts import REPO, load_script

import boat_mm  # noqa: F401
from boat_mm.models.backbones import BOATSwin

EMBED, DEPTHS, HEADS, CLASSES = 24, (2, 2, 2, 2), (1, 2, 2, 4), 10
ARCH = dict(embed_dims=EMBED, depths=list(DEPTHS), num_heads=list(HEADS))


class TrainingConfig:
    """Stands for the yacs config the published files pickle; the
    converter's subprocess cannot import this module."""

    def __init__(self):
        self.lr = 1e-3


def original_swin_state(seed: int = 0) -> dict:
    """Random weights under the published BOAT-Swin key names and shapes
    (``BOAT-Swin/models/boat_swin_transformer.py``), buffers included."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    sd = {}

    def linear(name, n_out, n_in, bias=True):
        sd[f'{name}.weight'] = rand(n_out, n_in)
        if bias:
            sd[f'{name}.bias'] = rand(n_out)

    def norm(name, c):
        sd[f'{name}.weight'], sd[f'{name}.bias'] = 1 + rand(c), rand(c)

    sd['patch_embed.proj.weight'] = rand(EMBED, 3, 4, 4)
    sd['patch_embed.proj.bias'] = rand(EMBED)
    norm('patch_embed.norm', EMBED)
    for s, (depth, heads) in enumerate(zip(DEPTHS, HEADS)):
        c = EMBED * 2**s
        last = s == len(DEPTHS) - 1
        for i in range(depth):
            pre = f'layers.{s}.blocks.{i}.'
            norm(pre + 'norm1', c)
            linear(pre + 'attn.qkv', 3 * c, c)
            linear(pre + 'attn.proj', c, c)
            sd[pre + 'attn.relative_position_bias_table'] = rand(169, heads)
            sd[pre + 'attn.relative_position_index'] = torch.zeros(
                49, 49, dtype=torch.long)
            if i % 2 == 1 and not last:
                sd[pre + 'attn_mask'] = torch.zeros(4, 49, 49)
                norm(pre + 'norm4', c)
                linear(pre + 'attnC.qkv', 3 * c, c)
                linear(pre + 'attnC.proj', c, c)
                sd[pre + 'attnC.get_v.weight'] = rand(c, 1, 3, 3)
                sd[pre + 'attnC.get_v.bias'] = rand(c)
            norm(pre + 'norm2', c)
            linear(pre + 'mlp.fc1', 4 * c, c)
            linear(pre + 'mlp.fc2', c, 4 * c)
        if not last:
            norm(f'layers.{s}.downsample.norm', 4 * c)
            linear(f'layers.{s}.downsample.reduction', 2 * c, 4 * c, False)
    norm('norm', EMBED * 8)
    linear('head', CLASSES, EMBED * 8)
    return sd


@pytest.fixture(scope='module')
def tool():
    path = 'tools/model_converters/boat2mm.py'
    module = load_script(path)
    module.path = osp.join(REPO, path)
    return module


@pytest.fixture(scope='module')
def converted(tool, tmp_path_factory):
    """Run the command line once on a published-layout file."""
    tmp = tmp_path_factory.mktemp('boat2mm')
    src, dst = str(tmp / 'tiny.pth'), str(tmp / 'out' / 'tiny_mm.pth')
    torch.save(
        dict(model=original_swin_state(), config=TrainingConfig(), epoch=3),
        src)
    proc = subprocess.run([sys.executable, tool.path, src, dst],
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dst, proc.stdout


def test_cli_output(converted):
    dst, stdout = converted
    for step in ('[1/4]', '[2/4]', '[3/4]', '[4/4]', 'Done'):
        assert step in stdout
    assert 'TrainingConfig' in stdout  # metadata object reported, not run
    assert 'BOAT-Swin, arch custom' in stdout
    assert 'dropped 11 derived buffers' in stdout  # 8 indices + 3 masks
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    assert ckpt['meta']['family'] == 'swin'
    # The widths of every stage, as read from the file.
    assert ckpt['meta']['backbone']['arch'] == dict(
        ARCH, embed_dims=[EMBED * 2**i for i in range(len(DEPTHS))])
    keys = list(ckpt['state_dict'])
    assert all(k.startswith(('backbone.', 'head.fc.')) for k in keys)
    assert not any('relative_position_index' in k or 'attn_mask' in k
                   for k in keys)


def test_loads_into_classifier_strict(converted):
    from mmpretrain.registry import MODELS
    dst, _ = converted
    state = torch.load(dst, map_location='cpu', weights_only=True)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='BOATSwin', arch=ARCH, out_indices=(3, )),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead',
                    num_classes=CLASSES,
                    in_channels=EMBED * 8)))
    model.load_state_dict(state['state_dict'], strict=True)
    orig = original_swin_state()
    torch.testing.assert_close(model.head.fc.weight, orig['head.weight'])
    torch.testing.assert_close(model.backbone.norm3.bias, orig['norm.bias'])


def test_loads_into_upernet_by_prefix(converted):
    from mmseg.registry import MODELS
    dst, _ = converted
    state = torch.load(dst, map_location='cpu', weights_only=True)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(
            dict(
                type='EncoderDecoder',
                backbone=dict(
                    type='BOATSwin',
                    arch=ARCH,
                    init_cfg=dict(
                        type='Pretrained', checkpoint=dst,
                        prefix='backbone.')),
                decode_head=dict(
                    type='UPerHead',
                    in_channels=[EMBED * 2**i for i in range(4)],
                    in_index=[0, 1, 2, 3],
                    pool_scales=(1, 2, 3, 6),
                    channels=16,
                    num_classes=5,
                    norm_cfg=dict(type='BN', requires_grad=True),
                    align_corners=False,
                    loss_decode=dict(type='CrossEntropyLoss'))))
    model.init_weights()
    backbone = model.backbone.state_dict()
    for key, value in state['state_dict'].items():
        if key.startswith('backbone.'):
            torch.testing.assert_close(backbone[key[len('backbone.'):]], value)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 40, 52), mode='tensor')
    assert logits.shape == (1, 5, 10, 13)


@pytest.mark.parametrize(
    'case',
    ['unknown', 'missing', 'ema', 'no_file', 'truncated', 'converted', 'same'])
def test_cli_errors(tool, tmp_path, capsys, case):
    state = original_swin_state()
    dst = str(tmp_path / 'dst.pth')
    if case == 'unknown':
        state['layers.2.blocks.1.attnC.scale'] = torch.ones(1)
        message = 'layers.2.blocks.1.attnC.scale'
    elif case == 'missing':
        del state['layers.0.downsample.reduction.weight']
        message = 'layers.0.downsample.reduction.weight'
    elif case == 'ema':
        message = 'state_dict_ema'
    elif case == 'truncated':
        message = 'src.pth is not a readable checkpoint'
    elif case == 'converted':
        # What boat2mm writes: the classifier's weights, boat-mm's names.
        model = BOATSwin(arch=ARCH, out_indices=(3, ))
        state = {'backbone.' + k: v for k, v in model.state_dict().items()}
        message = "already in boat-mm's layout"
    elif case == 'same':
        dst = str(tmp_path / '.' / 'src.pth')
        message = 'SRC and DST are the same file'
    else:
        message = 'not found'
    src = str(tmp_path / 'src.pth')
    if case != 'no_file':
        torch.save({'state_dict' if case == 'converted' else 'model': state},
                   src)
    if case == 'truncated':
        with open(src, 'rb') as f:
            data = f.read()
        with open(src, 'wb') as f:
            f.write(data[:len(data) // 2])
    before = open(src, 'rb').read() if osp.exists(src) else None
    args = [src, dst] + (['--ema'] if case == 'ema' else [])
    with pytest.raises(SystemExit) as exc:
        tool.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    if case == 'same':  # the source is left as it was
        assert open(src, 'rb').read() == before
    else:
        assert not osp.exists(dst)
