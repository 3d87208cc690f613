# Copyright (c) boat-mm contributors. All rights reserved.
"""BOATSwin: shapes for any input, arguments, invariances, and the
converter of the published BOAT-Swin checkpoints."""
import math
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from mmengine.registry import DefaultScope

import boat_mm  # noqa: F401
from boat_mm.models.backbones import BOATSwin
from boat_mm.models.utils import BOATShiftWindowMSA
from boat_mm.models.utils.window_attn import relative_position_index

TINY = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
# Narrower still, for the large inputs.
NANO = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))


def build(arch=TINY, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = BOATSwin(arch=arch, **kwargs)
    # Non-trivial norms and biases, so that a misplaced one shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def expected_shapes(arch, hw, batch=1):
    return [(batch, arch['embed_dims'] * 2**i, math.ceil(hw[0] / 2**(i + 2)),
             math.ceil(hw[1] / 2**(i + 2))) for i in range(4)]


@pytest.fixture(scope='module')
def tiny_model():
    return build().eval()


# ---------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('hw', [(224, 224), (255, 255), (33, 47)])
def test_output_shapes_tiny(tiny_model, hw):
    with torch.no_grad():
        outs = tiny_model(torch.randn(1, 3, *hw))
    assert isinstance(outs, tuple)
    assert [tuple(o.shape) for o in outs] == expected_shapes(TINY, hw)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('hw', [(512, 512), (512, 683), (1024, 1024)])
def test_output_shapes_large(hw):
    model = build(NANO).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == expected_shapes(NANO, hw)


def test_out_indices_and_tuple(tiny_model):
    model = build(out_indices=(1, -1)).eval()
    assert model.out_indices == (1, 3)
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == 2
    assert [o.shape[1] for o in outs] == [48, 192]
    # Same features as the full model where both output.
    model.load_state_dict(tiny_model.state_dict(), strict=False)
    with torch.no_grad():
        ref, ours = tiny_model(x), model(x)
    torch.testing.assert_close(ours[0], ref[1])
    torch.testing.assert_close(ours[1], ref[3])
    with pytest.raises(ValueError, match='out of range'):
        BOATSwin(arch=TINY, out_indices=(4, ))


# The original models' parameter counts (30.27M, 55.16M, 97.61M, as in
# configs/boat_swin/README.md),
# classifier with a 1000-class head.
FULL_PARAMS = {'tiny': 30_265_186, 'small': 55_158_898, 'base': 97_612_960}
FSLA_BLOCKS = {'tiny': 5, 'small': 11, 'base': 11}


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_full_archs(arch):
    model = BOATSwin(arch=arch[0]).eval()
    # The classifier: out_indices=(3, ) (norm3 only) + a 1000-class head.
    width = model.num_features[-1]
    extra_norms = sum(p.numel() for i in range(3)
                      for p in getattr(model, f'norm{i}').parameters())
    n = sum(p.numel() for p in model.parameters()) - extra_norms
    n += width * 1000 + 1000
    assert n == FULL_PARAMS[arch]
    assert round(n / 1e6, 2) == {
        'tiny': 30.27,
        'small': 55.16,
        'base': 97.61
    }[arch]
    assert sum(1 for m in model.modules() if m.__class__.__name__ ==
               'FeatureSpaceLocalAttention') == FSLA_BLOCKS[arch]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 36, 64))
    assert [tuple(o.shape) for o in outs
            ] == expected_shapes(dict(embed_dims=model.embed_dims), (36, 64))


# ---------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------


def test_arch_validation():
    with pytest.raises(ValueError, match=r"'base'.*'small'.*'tiny'"):
        BOATSwin(arch='huge')
    with pytest.raises(ValueError, match='num_heads'):
        BOATSwin(arch=dict(embed_dims=24, depths=(2, 2)))
    with pytest.raises(ValueError, match='one entry per stage'):
        BOATSwin(arch=dict(embed_dims=24, depths=(2, 2), num_heads=(1, )))
    with pytest.raises(ValueError, match='unknown keys'):
        BOATSwin(arch=dict(TINY, mlp=3))
    with pytest.raises(ValueError, match='divisible'):
        BOATSwin(arch=dict(embed_dims=20, depths=(2, ), num_heads=(3, )))
    with pytest.raises(ValueError, match='fsla_cfg must not set'):
        BOATSwin(arch=TINY, fsla_cfg=dict(num_heads=2))
    with pytest.raises(ValueError, match='frozen_stages'):
        BOATSwin(arch=TINY, frozen_stages=5)
    assert BOATSwin(arch='S').depths == [2, 2, 18, 2]


def test_fsla_placement_and_cfg():
    model = BOATSwin(
        arch=TINY, fsla_cfg=dict(group_size=16, overlap=4, kmeans_iters=1))
    with_fsla = [(i, j) for i, stage in enumerate(model.stages)
                 for j, block in enumerate(stage.blocks) if block.with_fsla]
    # Shifted (odd) blocks of all stages but the last.
    assert with_fsla == [(0, 1), (1, 1), (2, 1)]
    fsla = model.stages[1].blocks[1].fsla
    assert (fsla.group_size, fsla.overlap, fsla.kmeans_iters) == (16, 4, 1)
    assert fsla.scale == pytest.approx((48 // 2)**-0.5)
    shifts = [b.attn.shift_size for s in model.stages for b in s.blocks]
    assert shifts == [0, 3] * 4


def test_without_fsla_equals_block_without_fsla():
    plain = build(NANO, with_fsla=False).eval()
    assert not any('fsla' in k for k in plain.state_dict())
    boat = build(NANO, seed=1).eval()
    missing, unexpected = plain.load_state_dict(
        boat.state_dict(), strict=False)
    assert not missing
    assert unexpected and all('fsla' in k for k in unexpected)
    x = torch.randn(1, 3, 56, 40)
    with torch.no_grad():
        differs = (plain(x)[3] - boat(x)[3]).abs().max()
        # Zero FSLA output projections: the FSLA residual vanishes.
        for name, p in boat.named_parameters():
            if '.fsla.proj.' in name:
                p.zero_()
        outs_boat, outs_plain = boat(x), plain(x)
    assert differs > 1e-3
    for a, b in zip(outs_boat, outs_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_without_fsla_equals_mmpretrain_swin():
    """FSLA off at 224: exactly mmpretrain's Swin (same parameter names)."""
    from mmpretrain.models.backbones import SwinTransformer
    plain = build(NANO, with_fsla=False).eval()
    ref = SwinTransformer(
        arch=dict(NANO), out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    ref.eval()
    missing, unexpected = ref.load_state_dict(plain.state_dict(), strict=False)
    # Only the index buffers, which BOATSwin does not save.
    assert not unexpected and missing
    assert all(k.endswith('relative_position_index') for k in missing)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, b in zip(plain(x), ref(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_layer_depth_as_mmpretrain_swin():
    """Layer-wise depths (mmpretrain's layer-wise learning-rate decay) as
    mmpretrain's Swin gives them, parameter for parameter; FSLA's take
    their block's depth. The decay builds an optimizer of a classifier."""
    from mmpretrain.engine.optimizers import \
        LearningRateDecayOptimWrapperConstructor
    from mmpretrain.models import ImageClassifier
    from mmpretrain.models.backbones import SwinTransformer
    model = build(NANO)
    ref = SwinTransformer(arch=dict(NANO), out_indices=(0, 1, 2, 3))
    names = [n for n, _ in model.named_parameters()]
    shared = [n for n, _ in ref.named_parameters()]
    assert set(shared) < set(names)
    for name in shared + ['head.fc.weight']:
        name = 'backbone.' + name if name in shared else name
        assert model.get_layer_depth(name, 'backbone.') == \
            ref.get_layer_depth(name, 'backbone.'), name
    for name in names:
        if '.fsla.' in name:
            block = name[:name.index('.fsla.')] + '.attn.w_msa.qkv.weight'
            assert model.get_layer_depth(name) == model.get_layer_depth(block)
    classifier = ImageClassifier(
        backbone=dict(type='BOATSwin', arch=dict(NANO), out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=64))
    optimizer = LearningRateDecayOptimWrapperConstructor(
        dict(optimizer=dict(type='AdamW', lr=1., weight_decay=0.)),
        dict(layer_decay_rate=0.5))(classifier).optimizer
    lrs = {g['param_name']: g['lr'] for g in optimizer.param_groups}
    layers = sum(NANO['depths']) + 2
    assert lrs['backbone.patch_embed.projection.weight'] == 0.5**(layers - 1)
    assert lrs['head.fc.weight'] == 1.


def test_padded_window_attention_ignores_padding():
    """A 5x6 map in one 7x7 window: attention over the 30 real tokens only,
    with their relative position biases (computed here by hand)."""
    torch.manual_seed(0)
    attn = BOATShiftWindowMSA(8, 2, 7, shift_size=3).eval()
    with torch.no_grad():
        attn.w_msa.relative_position_bias_table.normal_()
    H, W = 5, 6
    x = torch.randn(2, H * W, 8)
    with torch.no_grad():
        out = attn(x, (H, W))  # min(H, W) <= 7: no shift
        w = attn.w_msa
        q, k, v = w.qkv(x).view(2, H * W, 3, 2, 4).permute(2, 0, 3, 1, 4)
        rows, cols = torch.meshgrid(
            torch.arange(H), torch.arange(W), indexing='ij')
        rows, cols = rows.flatten(), cols.flatten()
        dr = rows[:, None] - rows[None, :] + 6
        dc = cols[:, None] - cols[None, :] + 6
        bias = w.relative_position_bias_table[dr * 13 + dc].permute(2, 0, 1)
        att = (q * w.scale @ k.transpose(-2, -1) + bias).softmax(-1)
        ref = w.proj((att @ v).transpose(1, 2).reshape(2, H * W, 8))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_shift_only_when_map_exceeds_window():
    """As the original: a map whose shorter side fits one window is not
    shifted; larger maps are (the shift changes the result)."""
    torch.manual_seed(0)
    shifted = BOATShiftWindowMSA(8, 2, 7, shift_size=3).eval()
    plain = BOATShiftWindowMSA(8, 2, 7, shift_size=0).eval()
    plain.load_state_dict(shifted.state_dict())
    with torch.no_grad():
        for hw, same in [((7, 7), True), ((7, 20), True), ((9, 9), False)]:
            x = torch.randn(1, hw[0] * hw[1], 8)
            diff = (shifted(x, hw) - plain(x, hw)).abs().max()
            assert (diff < 1e-6) == same, hw
    assert not any('relative_position_index' in k
                   for k in shifted.state_dict())


def test_frozen_stages():
    model = build(NANO, frozen_stages=2)
    model.train()
    frozen = [
        model.patch_embed, model.stages[0], model.stages[1], model.norm0,
        model.norm1
    ]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    for m in [model.stages[2], model.stages[3], model.norm2, model.norm3]:
        assert all(p.requires_grad for p in m.parameters())
        assert all(sub.training for sub in m.modules())
    sum(o.sum() for o in model(torch.randn(1, 3, 32, 32))).backward()
    assert model.stages[0].blocks[1].fsla.qkv.weight.grad is None
    assert model.stages[2].blocks[1].fsla.qkv.weight.grad is not None
    # -1 freezes nothing; 0 only the stem: the patch embedding and the
    # dropout after it (eval, as in mmseg's Swin).
    x = torch.randn(1, 3, 32, 32)
    for frozen in (-1, 0):
        model = build(NANO, frozen_stages=frozen, drop_rate=0.5)
        model.train()
        assert model.patch_embed.projection.weight.requires_grad == (
            frozen < 0)
        assert model.drop_after_pos.training == (frozen < 0)
        tokens = model._embed(x)[0]
        assert torch.equal(
            model._post_embed(tokens), model._post_embed(tokens)) == (
                frozen >= 0)
        assert model.stages[0].blocks[0].norm1.weight.requires_grad


def test_frozen_stages_freeze_one_stage_less_than_mmpretrains():
    """docs/train_test.md: mmseg's meaning, so mmpretrain's Swin with the
    same frozen_stages freezes one stage more (its value N - 1 freezes
    what ours does with N)."""
    from mmpretrain.models import SwinTransformer

    def frozen(model) -> list:
        return [
            all(not p.requires_grad for p in m.parameters())
            for m in [model.patch_embed, *model.stages]
        ]

    for n in range(1, 4):
        ours = build(NANO, frozen_stages=n)
        theirs = SwinTransformer(arch=NANO, frozen_stages=n - 1)
        # mmpretrain freezes in train(), ours when built and in train().
        ours.train(), theirs.train()
        assert frozen(ours) == [True] + [s < n for s in range(4)]
        assert frozen(theirs) == frozen(ours), n


def test_with_cp_same_result_and_used(monkeypatch):
    x = torch.randn(2, 3, 32, 40)
    plain = build(NANO, drop_path_rate=0.)
    cp_model = build(NANO, drop_path_rate=0., with_cp=True)
    calls = []
    checkpoint = torch_checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, 'checkpoint', counting)
    grads = []
    for model in (plain, cp_model):
        model.train()
        outs = model(x)
        sum((o * o).mean() for o in outs).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == sum(NANO['depths'])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        cp_model(x)
    assert len(calls) == sum(NANO['depths'])  # not under no_grad


def test_batch_independence():
    model = build(NANO).eval()
    torch.manual_seed(3)
    x = torch.randn(3, 3, 72, 64)  # stage 1: 288 tokens, several clusters
    with torch.no_grad():
        together = model(x)
        alone = model(x[1:2])
    for a, b in zip(together, alone):
        assert (a[1:2] - b).abs().max() <= 1e-5


# ---------------------------------------------------------------------------
# Initialisation and registry.
# ---------------------------------------------------------------------------


def test_default_init():
    model = BOATSwin(arch=TINY)
    model.init_weights()
    block = model.stages[0].blocks[1]
    assert torch.all(block.norm_fsla.weight == 1)
    assert torch.all(block.fsla.qkv.bias == 0)
    assert block.fsla.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert block.attn.w_msa.relative_position_bias_table.abs().sum() > 0


def test_init_cfg_pretrained_prefix(tmp_path):
    """Constant init, then a classifier checkpoint through the prefix: the
    checkpoint wins where it has weights (all but norm3 here)."""
    src = build(seed=5)
    ckpt = OrderedDict(('backbone.' + k, v)
                       for k, v in src.state_dict().items()
                       if not k.startswith('norm3.'))
    ckpt['head.fc.weight'] = torch.zeros(10, 192)
    path = str(tmp_path / 'cls.pth')
    torch.save({'state_dict': ckpt, 'meta': {}}, path)
    model = BOATSwin(
        arch=TINY,
        init_cfg=[
            dict(type='Constant', layer='LayerNorm', val=2.),
            dict(type='Pretrained', checkpoint=path, prefix='backbone.')
        ])
    model.init_weights()
    state = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith('norm3.'):
            torch.testing.assert_close(state[k], v)
    assert torch.all(model.norm3.weight == 2.)


def test_init_cfg_missing_file():
    model = BOATSwin(
        arch=TINY,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='nowhere/boat.pth',
            prefix='backbone.'))
    with pytest.raises(FileNotFoundError, match='boat2mm.py'):
        model.init_weights()


def test_loads_mmcls_era_final_norm(tmp_path):
    """Old (mmcls) Swin files, without state-dict versions, store the final
    norm as ``norm.*``; mmpretrain's Swin loads it as ``norm3``."""
    from collections import OrderedDict
    src = build(NANO, seed=1, out_indices=(3, ))
    old = OrderedDict(
        (k.replace('norm3.', 'norm.'), v) for k, v in src.state_dict().items())
    assert 'norm.weight' in old and 'norm3.weight' not in old
    model = BOATSwin(arch=NANO, out_indices=(3, ))
    model.load_state_dict(old, strict=True)
    torch.testing.assert_close(model.norm3.weight, src.norm3.weight)
    # Under a classifier's prefix, through MMEngine's Pretrained init.
    path = str(tmp_path / 'old.pth')
    torch.save({'state_dict': {
        'backbone.' + k: v
        for k, v in old.items()
    }}, path)
    model = BOATSwin(
        arch=NANO,
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    torch.testing.assert_close(model.norm3.bias, src.norm3.bias)
    # A versioned (mmpretrain >= 2) file keeps its names.
    old._metadata = OrderedDict({'': dict(version=2)})
    missing, unexpected = BOATSwin(
        arch=NANO, out_indices=(3, )).load_state_dict(
            old, strict=False)
    assert missing == ['norm3.weight', 'norm3.bias']
    assert unexpected == ['norm.weight', 'norm.bias']


def test_loads_checkpoints_with_derived_buffers(tiny_model):
    """Old files hold the index and mask buffers (stale values here): they
    load strictly and are dropped, the model keeps what it derives."""
    state = tiny_model.state_dict()
    key = 'stages.0.blocks.0.attn.w_msa.relative_position_index'
    state[key] = torch.zeros(49, 49, dtype=torch.long)
    state['stages.0.blocks.1.attn_mask'] = torch.zeros(1)
    model = BOATSwin(arch=TINY).eval()
    model.load_state_dict(state, strict=True)
    index = model.stages[0].blocks[0].attn.w_msa.relative_position_index
    assert torch.equal(index, relative_position_index((7, 7)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), tiny_model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('scope', ['mmseg', 'mmpretrain'])
def test_registry_scopes(scope):
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(type='BOATSwin', arch=TINY))
    assert isinstance(model, BOATSwin)


def test_classifier_is_norm_mean_linear():
    """mmpretrain ImageClassifier = final norm, mean over tokens, linear."""
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        clf = MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='BOATSwin', arch=TINY, out_indices=(3, )),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=7,
                    in_channels=192))).eval()
    full = build(seed=2).eval()
    clf.backbone.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = clf(x, mode='tensor')
        # Tokens before the output norm: the full model's last stage.
        tokens = []
        full.norm3.register_forward_hook(lambda m, i, o: tokens.append(i[0]))
        full(x)
        pooled = F.layer_norm(tokens[0], (192, ), clf.backbone.norm3.weight,
                              clf.backbone.norm3.bias).mean(1)
        ref = F.linear(pooled, clf.head.fc.weight, clf.head.fc.bias)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Converter (published layout -> boat-mm).
# ---------------------------------------------------------------------------


def swin_merge_inverse(w: torch.Tensor, dim: int) -> torch.Tensor:
    """mmcv (Unfold) order -> Swin's x0, x1, x2, x3 order, by loops."""
    c = w.shape[dim] // 4
    out = torch.empty_like(w)
    # Swin slot of each (row, col) offset: x0 (0,0), x1 (1,0), x2 (0,1),
    # x3 (1,1); Unfold index of channel ch at (row, col): ch*4 + row*2 + col.
    for slot, (row, col) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        for ch in range(c):
            src = ch * 4 + row * 2 + col
            out.select(dim, slot * c + ch).copy_(w.select(dim, src))
    return out


OURS_TO_ORIG = [
    (r'backbone\.patch_embed\.projection\.', 'patch_embed.proj.'),
    (r'backbone\.patch_embed\.norm\.', 'patch_embed.norm.'),
    (r'backbone\.stages\.(\d)\.downsample\.', r'layers.\1.downsample.'),
    (r'backbone\.stages\.(\d)\.blocks\.(\d)\.attn\.w_msa\.',
     r'layers.\1.blocks.\2.attn.'),
    (r'backbone\.stages\.(\d)\.blocks\.(\d)\.fsla\.',
     r'layers.\1.blocks.\2.attnC.'),
    (r'backbone\.stages\.(\d)\.blocks\.(\d)\.norm_fsla\.',
     r'layers.\1.blocks.\2.norm4.'),
    (r'backbone\.stages\.(\d)\.blocks\.(\d)\.ffn\.layers\.0\.0\.',
     r'layers.\1.blocks.\2.mlp.fc1.'),
    (r'backbone\.stages\.(\d)\.blocks\.(\d)\.ffn\.layers\.1\.',
     r'layers.\1.blocks.\2.mlp.fc2.'),
    (r'backbone\.stages\.(\d)\.blocks\.(\d)\.norm(\d)\.',
     r'layers.\1.blocks.\2.norm\3.'),
    (r'backbone\.norm3\.', 'norm.'),
    (r'head\.fc\.', 'head.'),
]


def to_original(ours: dict) -> dict:
    """Our classifier state dict laid out like a published file."""
    orig = OrderedDict()
    for key, value in ours.items():
        new = key
        for pattern, repl in OURS_TO_ORIG:
            new, n = re.subn('^' + pattern, repl, key)
            if n:
                break
        assert new != key, key
        if new.endswith('downsample.reduction.weight'):
            value = swin_merge_inverse(value, 1)
        elif '.downsample.norm.' in new:
            value = swin_merge_inverse(value, 0)
        orig[new] = value.clone()
    # Buffers the published files carry.
    for s in range(4):
        for i in range(2):
            orig[f'layers.{s}.blocks.{i}.attn.relative_position_index'] = \
                torch.zeros(49, 49, dtype=torch.long)
        orig[f'layers.{s}.blocks.1.attn_mask'] = torch.zeros(4, 49, 49)
    return orig


@pytest.fixture(scope='module')
def ours_and_original():
    model = build(seed=7, out_indices=(3, ))
    ours = OrderedDict(
        ('backbone.' + k, v) for k, v in model.state_dict().items())
    ours['head.fc.weight'] = torch.randn(10, 192)
    ours['head.fc.bias'] = torch.randn(10)
    return ours, to_original(ours)


def test_converter_round_trip(ours_and_original):
    ours, orig = ours_and_original
    converted = BOATSwin.published.convert(orig)
    assert set(converted) == set(ours)
    for k, v in ours.items():
        assert torch.equal(converted[k], v), k
    info = BOATSwin.published.detect(orig)
    assert info['arch'] is None and info['embed_dims'] == [24, 48, 96, 192]
    assert info['depths'] == (2, 2, 2, 2)
    assert info['num_heads'] == (1, 2, 2, 4)
    assert (info['window_size'], info['patch_size']) == (7, 4)
    assert info['with_fsla'] and info['num_classes'] == 10


def test_converted_merging_computes_swin_merging(ours_and_original):
    """Swin's merging (x0..x3 concatenation, written here) with the
    original weights equals mmcv's PatchMerging with converted ones."""
    ours, orig = ours_and_original
    model = build(out_indices=(3, ))
    model.load_state_dict({
        k[9:]: v
        for k, v in ours.items() if k.startswith('backbone.')
    })
    x = torch.randn(2, 6, 10, 24)
    merged, _ = model.stages[0].downsample(x.flatten(1, 2), (6, 10))
    x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
    x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    cat = torch.cat([x0, x1, x2, x3], -1).flatten(1, 2)
    cat = F.layer_norm(cat, (96, ), orig['layers.0.downsample.norm.weight'],
                       orig['layers.0.downsample.norm.bias'])
    ref = cat @ orig['layers.0.downsample.reduction.weight'].T
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)


def test_converter_errors(ours_and_original):
    _, orig = ours_and_original
    bad = OrderedDict(orig)
    bad['layers.0.blocks.0.attn.extra.weight'] = torch.zeros(1)
    with pytest.raises(KeyError, match=r'layers\.0\.blocks\.0\.attn\.extra'):
        BOATSwin.published.convert(bad)
    bad = OrderedDict(orig)
    del bad['layers.1.blocks.1.attnC.qkv.weight']
    del bad['norm.bias']
    with pytest.raises(
            KeyError,
            match=r"missing keys \['layers\.1\.blocks"
            r"\.1\.attnC\.qkv\.weight', 'norm\.bias'\]"):
        BOATSwin.published.convert(bad)
    with pytest.raises(KeyError, match='patch_embed'):
        BOATSwin.published.detect({'stem.weight': torch.zeros(1)})


def test_converter_plain_swin(ours_and_original):
    """Checkpoints without FSLA (plain Swin) convert for with_fsla=False."""
    _, orig = ours_and_original
    plain = OrderedDict((k, v) for k, v in orig.items()
                        if '.attnC.' not in k and '.norm4.' not in k)
    converted = BOATSwin.published.convert(plain)
    model = BOATSwin(arch=TINY, with_fsla=False, out_indices=(3, ))
    model.load_state_dict(
        {
            k[9:]: v
            for k, v in converted.items() if k.startswith('backbone.')
        },
        strict=True)
