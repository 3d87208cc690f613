# Copyright (c) boat-mm contributors. All rights reserved.
"""BOATCSWin: shapes at any size, arguments, classification, converter."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from mmengine.registry import init_default_scope

import boat_mm  # noqa: F401
from boat_mm.models.backbones import BOATCSWin
from boat_mm.models.utils import FeatureSpaceLocalAttention

# Tiny custom archs keep the suite fast; the full ones are built once each.
ARCH = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
ARCH1 = dict(embed_dims=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
SIZES = [(224, 224), (255, 255), (512, 512), (512, 683), (33, 47),
         (1024, 1024)]


def _expected_hw(h: int, w: int):
    """Stride 4, then halving, rounding up (mmseg Swin's sizes)."""
    out = [(math.ceil(h / 4), math.ceil(w / 4))]
    for _ in range(3):
        out.append(tuple(math.ceil(s / 2) for s in out[-1]))
    return out


@pytest.fixture(scope='module')
def mmseg_swin():
    from mmseg.models.backbones import SwinTransformer
    swin = SwinTransformer(
        embed_dims=4, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    swin.eval()  # mmseg's Swin.train() does not return self
    return swin


@pytest.mark.parametrize('hw', SIZES)
def test_output_shapes_any_size(hw, mmseg_swin):
    # 1024^2 is 65536 stage-1 tokens: FSLA there is slow on CPU, so that
    # size checks the CSWin padding path only (FSLA sizes: its own tests).
    big = hw[0] * hw[1] > 600 * 700
    model = BOATCSWin(arch=ARCH1, with_fsla=not big).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == 4
    expected = _expected_hw(*hw)
    for i, out in enumerate(outs):
        assert out.shape == (1, 8 * 2**i, *expected[i])
        assert torch.isfinite(out).all()
    if not big:  # same sizes as mmseg's Swin
        with torch.no_grad():
            swin = mmseg_swin(x)
        assert [o.shape[2:] for o in outs] == [o.shape[2:] for o in swin]


@pytest.mark.parametrize('arch, dims, params', [
    ('tiny', 64, 26_390_952),
    ('small', 64, 40_112_488),
    ('base', 96, 89_628_712),
])
def test_full_archs(arch, dims, params):
    """Parameter counts of the published models (backbone + 1000-class
    head) and a forward at a small size."""
    model = BOATCSWin(arch=arch, out_indices=(3, ), drop_path_rate=0.)
    head = 8 * dims * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) + head == params
    fsla = sum(
        isinstance(m, FeatureSpaceLocalAttention) for m in model.modules())
    assert fsla == {'tiny': 14, 'small': 20, 'base': 20}[arch]
    assert BOATCSWin(arch=arch[0]).arch_settings == model.arch_settings
    model.eval()
    with torch.no_grad():
        (out, ) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 8 * dims, 2, 2)


def test_out_indices_and_tuple():
    model = BOATCSWin(arch=ARCH1, out_indices=(1, -1)).eval()
    assert model.out_indices == (1, 3)
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3')
    assert not hasattr(model, 'norm0')
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert isinstance(outs, tuple)
    assert [o.shape for o in outs] == [(2, 16, 8, 8), (2, 64, 2, 2)]
    with pytest.raises(ValueError, match='out_indices'):
        BOATCSWin(arch=ARCH1, out_indices=(4, ))


def test_block_layout_and_drop_path():
    model = BOATCSWin(arch=ARCH, drop_path_rate=0.3)
    blocks = [b for s in model.stages for b in s.blocks]
    # FSLA in even-indexed blocks of every stage, the last included.
    assert [b.with_fsla for b in blocks] == [True, False] * 4
    assert all(hasattr(b, 'fsla') == b.with_fsla for b in blocks)
    expected = torch.linspace(0, 0.3, 8).tolist()
    assert [b.drop_path.drop_prob for b in blocks] == pytest.approx(expected)
    assert [b.ffn.dropout_layer.drop_prob
            for b in blocks] == pytest.approx(expected)
    # Two stripe branches in stages 1-3, one whole-map branch in stage 4.
    assert [len(s.blocks[0].attn.branches) for s in model.stages] == \
        [2, 2, 2, 1]
    assert [s.blocks[0].attn.branches[0].split_size
            for s in model.stages[:3]] == [1, 2, 7]
    assert model.stages[0].downsample is None
    assert all(s.downsample is not None for s in model.stages[1:])
    # FSLA of BOAT-CSWin: logits unscaled, as the published weights need.
    assert blocks[0].fsla.scale == 1.0


def test_fsla_cfg_passed_through():
    model = BOATCSWin(
        arch=ARCH1, fsla_cfg=dict(group_size=16, overlap=4, qk_scale=None))
    fsla = model.stages[1].blocks[0].fsla
    assert (fsla.group_size, fsla.overlap) == (16, 4)
    assert fsla.scale == pytest.approx(8**-0.5)  # 16 dims / 2 heads
    with pytest.raises(ValueError, match='fsla_cfg'):
        BOATCSWin(arch=ARCH1, fsla_cfg=dict(num_heads=4))


def test_arch_errors():
    with pytest.raises(ValueError, match="'tiny'"):
        BOATCSWin(arch='huge')
    with pytest.raises(ValueError, match='num_heads'):
        BOATCSWin(arch=dict(embed_dims=8, depths=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match='mlp_ratio'):
        BOATCSWin(arch=dict(ARCH1, mlp_ratio=2))
    with pytest.raises(ValueError, match='one entry per stage'):
        BOATCSWin(arch=dict(ARCH1, split_sizes=(1, 2)))
    with pytest.raises(ValueError, match='frozen_stages'):
        BOATCSWin(arch=ARCH1, frozen_stages=5)
    # Odd heads: refused by the arch (the attention's own message named
    # an argument the backbone does not take), except in the last stage.
    with pytest.raises(ValueError, match='stage 1 has 1 heads.*even'):
        BOATCSWin(arch=dict(ARCH1, num_heads=(2, 1, 2, 2)))
    BOATCSWin(arch=dict(ARCH1, num_heads=(2, 2, 2, 1)))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        BOATCSWin(arch=ARCH1)(torch.randn(3, 32, 32))


@pytest.mark.parametrize('frozen', [-1, 0, 2, 4])
def test_frozen_stages(frozen):
    model = BOATCSWin(arch=ARCH1, frozen_stages=frozen)
    model.train()

    def trainable(m: nn.Module) -> bool:
        flags = {p.requires_grad for p in m.parameters()}
        assert len(flags) == 1
        return flags.pop()

    assert trainable(model.patch_embed) == (frozen < 0)
    assert model.patch_embed.training == (frozen < 0)
    for i, stage in enumerate(model.stages):
        assert trainable(stage) == (i >= frozen)
        assert stage.training == (i >= frozen)
        assert trainable(getattr(model, f'norm{i}')) == (i >= frozen)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(o.square().sum() for o in model(x))
    loss.backward()
    return total


def test_with_cp_same_result_less_memory():
    torch.manual_seed(0)
    plain = BOATCSWin(arch=ARCH1, drop_path_rate=0.)
    ckpt = BOATCSWin(arch=ARCH1, drop_path_rate=0., with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    saved_plain = _saved_bytes(plain, x)
    saved_ckpt = _saved_bytes(ckpt, x)
    # Only block inputs are kept; activations inside are recomputed.
    assert saved_ckpt < saved_plain / 3
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_with_fsla_false_is_cswin():
    torch.manual_seed(0)
    boat = BOATCSWin(arch=ARCH, drop_path_rate=0.).eval()
    cswin = BOATCSWin(arch=ARCH, drop_path_rate=0., with_fsla=False).eval()
    assert not any(
        isinstance(m, FeatureSpaceLocalAttention) for m in cswin.modules())
    assert not any('fsla' in k for k in cswin.state_dict())
    missing, unexpected = boat.load_state_dict(
        cswin.state_dict(), strict=False)
    assert not unexpected
    assert missing and all('fsla' in k for k in missing)
    # A BOAT model whose FSLA adds nothing computes the plain CSWin.
    for m in boat.modules():
        if isinstance(m, FeatureSpaceLocalAttention):
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(boat(x), cswin(x)):
            torch.testing.assert_close(a, b)
        nn.init.normal_(boat.stages[0].blocks[0].fsla.proj.bias)
        assert not torch.allclose(boat(x)[0], cswin(x)[0])


def test_batch_independence_all_stages():
    """A sample's features do not depend on its batch partners, stage 4
    included (7x7 = 49 tokens there: the original's paired clusters)."""
    torch.manual_seed(0)
    model = BOATCSWin(arch=ARCH1).eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        batch = model(x)
        for i in (0, 2):
            alone = model(x[i:i + 1])
            for a, b in zip(alone, batch):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=0)


def test_classifier_computes_norm_mean_linear():
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    model = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(type='BOATCSWin', arch=ARCH1, out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=5,
                      in_channels=64))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x, mode='tensor')
        tokens = model.backbone.forward_stages(x)[-1].flatten(2).transpose(
            1, 2)
        expected = model.head.fc(model.backbone.norm3(tokens).mean(1))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize('scope', ['mmseg', 'mmpretrain'])
def test_registry_builds_in_both_scopes(scope):
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    model = MODELS.build(dict(type='BOATCSWin', arch=ARCH1))
    assert isinstance(model, BOATCSWin)


def test_default_init():
    model = BOATCSWin(arch=ARCH1)
    model.init_weights()
    w = model.stages[2].blocks[0].ffn.layers[0][0].weight
    assert w.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.stages[0].blocks[0].attn.qkv.bias.abs().sum() == 0
    assert (model.norm0.weight == 1).all() and (model.norm0.bias == 0).all()


def _classifier_state(model: BOATCSWin) -> OrderedDict:
    state = OrderedDict(
        ('backbone.' + k, torch.randn_like(v) if v.is_floating_point() else v)
        for k, v in model.state_dict().items())
    state['head.fc.weight'] = torch.randn(5, 64)
    state['head.fc.bias'] = torch.randn(5)
    return state


def test_init_cfg_pretrained(tmp_path):
    ckpt = tmp_path / 'cls.pth'
    state = _classifier_state(BOATCSWin(arch=ARCH1))
    torch.save({'state_dict': state, 'meta': {}}, ckpt)
    model = BOATCSWin(
        arch=ARCH1,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(ckpt), prefix='backbone.'))
    model.init_weights()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state['backbone.' + k], msg=k)
    # Fewer outputs: the classifier's extra norms are simply not used.
    model = BOATCSWin(
        arch=ARCH1,
        out_indices=(3, ),
        init_cfg=dict(
            type='Pretrained', checkpoint=str(ckpt), prefix='backbone.'))
    model.init_weights()
    torch.testing.assert_close(model.norm3.weight,
                               state['backbone.norm3.weight'])


def test_init_cfg_list_and_missing_file(tmp_path):
    model = BOATCSWin(
        arch=ARCH1,
        init_cfg=[
            dict(type='Constant', layer='Linear', val=0.5, bias=0.),
        ])
    model.init_weights()
    assert (model.stages[0].blocks[0].attn.proj.weight == 0.5).all()
    missing = str(tmp_path / 'nope.pth')
    model = BOATCSWin(
        arch=ARCH1,
        init_cfg=dict(
            type='Pretrained', checkpoint=missing, prefix='backbone.'))
    with pytest.raises(FileNotFoundError, match='boat2mm.py'):
        model.init_weights()


def _original_layout(embed_dims, depths, with_fsla=True, classes=5):
    """A random checkpoint laid out like the published BOAT-CSWin files
    (docs/fsla.md section 6), written from the doc, not from our model."""
    C, sd = embed_dims, OrderedDict()

    def wb(name, *shape):
        sd[name + '.weight'] = torch.randn(*shape)
        sd[name + '.bias'] = torch.randn(shape[0])

    wb('stage1_conv_embed.0', C, 3, 7, 7)
    wb('stage1_conv_embed.2', C)
    for k, depth in enumerate(depths, start=1):
        if k > 1:
            wb(f'merge{k - 1}.conv', C * 2, C, 3, 3)
            wb(f'merge{k - 1}.norm', C * 2)
            C *= 2
        last = k == len(depths)
        for i in range(depth):
            p = f'stage{k}.{i}.'
            wb(p + 'qkv', 3 * C, C)
            wb(p + 'norm1', C)
            wb(p + 'proj', C, C)
            wb(p + 'norm2', C)
            wb(p + 'mlp.fc1', 4 * C, C)
            wb(p + 'mlp.fc2', C, 4 * C)
            for j in range(1 if last else 2):
                width = C if last else C // 2
                wb(p + f'attns.{j}.get_v', width, 1, 3, 3)
            if with_fsla and i % 2 == 0:
                wb(p + 'content_attn.qkv', 3 * C, C)
                wb(p + 'content_attn.proj', C, C)
                wb(p + 'content_attn.get_v', C, 1, 3, 3)
                wb(p + 'norm3', C)
    wb('norm', C)
    wb('head', classes, C)
    return sd


def _classifier(with_fsla=True):
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='BOATCSWin',
                arch=ARCH,
                out_indices=(3, ),
                with_fsla=with_fsla),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=5, in_channels=128)))


@pytest.mark.parametrize('with_fsla', [True, False])
def test_converter_round_trip(with_fsla):
    src = _original_layout(16, (2, 2, 2, 2), with_fsla)
    out = BOATCSWin.published.convert(src)
    model = _classifier(with_fsla)
    model.load_state_dict(out, strict=True)
    # Every original tensor lands exactly once, unchanged.
    assert len(out) == len(src)
    assert {id(v) for v in out.values()} == {id(v) for v in src.values()}
    bb = model.backbone
    pairs = {
        'stage1_conv_embed.0.weight':
        bb.patch_embed.projection.weight,
        'stage1_conv_embed.2.bias':
        bb.patch_embed.norm.bias,
        'merge1.conv.weight':
        bb.stages[1].downsample.projection.weight,
        'merge3.norm.weight':
        bb.stages[3].downsample.norm.weight,
        'stage1.1.qkv.weight':
        bb.stages[0].blocks[1].attn.qkv.weight,
        'stage3.0.attns.1.get_v.weight':
        bb.stages[2].blocks[0].attn.branches[1].get_v.weight,
        'stage4.1.attns.0.get_v.bias':
        bb.stages[3].blocks[1].attn.branches[0].get_v.bias,
        'stage2.1.proj.bias':
        bb.stages[1].blocks[1].attn.proj.bias,
        'stage2.0.mlp.fc1.weight':
        bb.stages[1].blocks[0].ffn.layers[0][0].weight,
        'stage4.1.mlp.fc2.bias':
        bb.stages[3].blocks[1].ffn.layers[1].bias,
        'norm.weight':
        bb.norm3.weight,
        'head.weight':
        model.head.fc.weight,
    }
    if with_fsla:
        pairs['stage4.0.content_attn.qkv.weight'] = \
            bb.stages[3].blocks[0].fsla.qkv.weight
        pairs['stage3.0.norm3.bias'] = bb.stages[2].blocks[0].norm_fsla.bias
        pairs['stage1.0.content_attn.get_v.weight'] = \
            bb.stages[0].blocks[0].fsla.get_v.weight
    for key, param in pairs.items():
        torch.testing.assert_close(param, src[key], msg=key)


def test_converter_detects_arch_and_prefix():
    src = _original_layout(16, (2, 2, 2, 2))
    info = BOATCSWin.published.detect(src)
    assert info == dict(
        arch=None,
        embed_dims=[16, 32, 64, 128],
        depths=(2, 2, 2, 2),
        in_channels=3,
        with_fsla=True,
        num_classes=5)
    wrapped = OrderedDict(('module.' + k, v) for k, v in src.items())
    assert list(BOATCSWin.published.convert(wrapped)) == list(
        BOATCSWin.published.convert(src))
    # The published archs, from keys and the stage widths (no big tensors).
    for name, dims, depths in [('tiny', 64, (1, 2, 21, 1)),
                               ('small', 64, (2, 4, 32, 2)),
                               ('base', 96, (2, 4, 32, 2))]:
        keys = {
            f'stage{k}.{i}.qkv.weight': torch.empty(0)
            for k, d in enumerate(depths, 1)
            for i in range(d)
        }
        keys['stage1_conv_embed.0.weight'] = torch.empty(dims, 3, 7, 7)
        for k in range(1, 5):
            keys[f'stage{k}.0.norm1.weight'] = torch.empty(dims * 2**(k - 1))
        assert BOATCSWin.published.detect(keys)['arch'] == name
    plain = _original_layout(16, (2, 2, 2, 2), with_fsla=False)
    assert not BOATCSWin.published.detect(plain)['with_fsla']
    # The file-level entry point picks this family's converter.
    from boat_mm.models.backbones import convert_boat_checkpoint
    family, out = convert_boat_checkpoint(
        {
            'state_dict': {},
            'state_dict_ema': wrapped
        }, use_ema=True)
    assert family is BOATCSWin
    assert list(out) == list(BOATCSWin.published.convert(src))


def test_converter_errors():
    src = _original_layout(8, (1, 2, 1, 1))
    bad = OrderedDict(src)
    bad['stage1.0.foo.weight'] = torch.zeros(1)
    del bad['stage2.1.norm2.bias']
    with pytest.raises(KeyError) as err:
        BOATCSWin.published.convert(bad)
    assert 'stage1.0.foo.weight' in str(err.value)
    assert 'stage2.1.norm2.bias' in str(err.value)
    odd = OrderedDict(src)  # FSLA weights in an odd block: not the original
    odd['stage2.1.content_attn.qkv.weight'] = torch.zeros(1)
    with pytest.raises(KeyError, match='stage2.1.content_attn.qkv.weight'):
        BOATCSWin.published.convert(odd)
    with pytest.raises(KeyError, match='stage1_conv_embed'):
        BOATCSWin.published.convert({'layers.0.blocks.0.norm1.weight': 0})
