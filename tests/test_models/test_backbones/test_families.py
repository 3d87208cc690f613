# Copyright (c) boat-mm contributors. All rights reserved.
"""Families are data: the checks every BOAT family must pass, run on every
registered family and on a toy third one defined here.

The toy family (``BOATToy``) is what a new family writes in its own file:
an ``arch_zoo`` whose widths do not double (48, 96, 160, 256), where FSLA
sits (the first block of every stage), its stem and stages, and the
layout of its (imaginary) published checkpoints beside the class, with a
value fix (position-bias tables stored transposed). Nothing else in
boat_mm or the tools names it, yet it builds, runs at an odd size,
outputs the stages of ``out_indices``, converts from its published layout
(checked against an inverse written independently here) and is counted by
the FLOPs tool.
"""
import math
import re
from collections import OrderedDict
from typing import Dict, Mapping, Sequence

import pytest
import torch
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule, ModuleList
from torch import Tensor

import boat_mm  # noqa: F401
from boat_mm.analysis.complexity import get_model_complexity
from boat_mm.models.backbones import (BaseBOATBackbone, base_boat,
                                      boat_families, convert_boat_checkpoint)
from boat_mm.models.backbones.boat_swin import BOATSwinBlock
from boat_mm.models.utils.ckpt_convert import (PublishedLayout,
                                               add_module_keys,
                                               blocks_per_stage)

# --- The toy family, as a family file would define it. ---


class ToyStage(BaseModule):
    """A stride-2 conv from the previous width (all but the first stage),
    then BOAT-Swin's blocks (4x4 windows, none shifted): a family may
    reuse another's blocks."""

    def __init__(self, in_dims: int, dims: int, depth: int, heads: int,
                 downsample: bool, rates: Sequence[float],
                 fsla_blocks: Sequence[bool], block_cfg: dict) -> None:
        super().__init__()
        self.downsample = PatchEmbed(
            in_channels=in_dims,
            embed_dims=dims,
            kernel_size=3,
            stride=2,
            padding=1,
            norm_cfg=block_cfg['norm_cfg']) if downsample else None
        self.blocks = ModuleList([
            BOATSwinBlock(
                dims,
                heads,
                window_size=4,
                with_fsla=fsla_blocks[j],
                drop_path_rate=rates[j],
                **block_cfg) for j in range(depth)
        ])

    def forward(self, x, hw_shape):
        if self.downsample is not None:
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *hw_shape)
            x, hw_shape = self.downsample(x)
        for block in self.blocks:
            x = block(x, hw_shape)
        return x, tuple(hw_shape), x, tuple(hw_shape)


class ToyPublished(PublishedLayout):  # beside BOATToy, as in a family file
    """Published toy files: ``toy_stem.{conv,ln}``, blocks
    ``toy_stage{s}.b{j}.*`` (``s`` from 0), merges ``toy_stage{s}.down``,
    bias tables stored ``(heads, rows)``."""
    _BLOCK = (('ln1', 'norm1'), ('mix.qkv', 'attn.w_msa.qkv'),
              ('mix.out', 'attn.w_msa.proj'), ('ln2', 'norm2'),
              ('fc1', 'ffn.layers.0.0'), ('fc2', 'ffn.layers.1'))
    _FSLA = (('ctx_ln', 'norm_fsla'), ('ctx.qkv', 'fsla.qkv'),
             ('ctx.out', 'fsla.proj'), ('ctx.dw', 'fsla.get_v'))

    def detect(self, state_dict: Mapping[str, Tensor]) -> dict:
        blocks = blocks_per_stage(state_dict, r'toy_stage(\d+)\.b(\d+)\.')
        depths = tuple(blocks[s] for s in range(len(blocks)))
        widths = [
            int(state_dict[f'toy_stage{s}.b0.ln1.weight'].shape[0])
            for s in range(len(depths))
        ]
        heads = [
            int(state_dict[f'toy_stage{s}.b0.mix.table'].shape[0])
            for s in range(len(depths))
        ]
        head = state_dict.get('head.weight')
        return dict(
            arch=self.backbone.zoo_name(
                embed_dims=widths, depths=depths, num_heads=heads),
            embed_dims=widths,
            depths=depths,
            num_heads=heads,
            in_channels=int(state_dict['toy_stem.conv.weight'].shape[1]),
            with_fsla=any('.ctx.' in k for k in state_dict),
            num_classes=None if head is None else int(head.shape[0]))

    def backbone_cfg(self, info: dict) -> dict:
        cfg = super().backbone_cfg(info)
        cfg['arch'] = info['arch'] or dict(
            embed_dims=info['embed_dims'],
            depths=list(info['depths']),
            num_heads=info['num_heads'])
        return cfg

    def add_stage_keys(self, names, stage, info) -> None:
        if stage:
            dst = f'backbone.stages.{stage}.downsample'
            add_module_keys(names, f'toy_stage{stage}.down.conv',
                            f'{dst}.projection')
            add_module_keys(names, f'toy_stage{stage}.down.ln', f'{dst}.norm')
        num = len(info['depths'])
        for j in range(info['depths'][stage]):
            src = f'toy_stage{stage}.b{j}'
            dst = f'backbone.stages.{stage}.blocks.{j}'
            names[f'{src}.mix.table'] = \
                f'{dst}.attn.w_msa.relative_position_bias_table'
            modules = self._BLOCK
            if info['with_fsla'] and self.backbone.has_fsla(stage, j, num):
                modules += self._FSLA
            for a, b in modules:
                add_module_keys(names, f'{src}.{a}', f'{dst}.{b}')

    def fix_value(self, key: str, value: Tensor) -> Tensor:
        if key.endswith('relative_position_bias_table'):
            return value.t()
        return value


class BOATToy(BaseBOATBackbone, register=False):
    """A toy third family: widths that do not double, FSLA in the first
    block of every stage."""
    family = 'toy'
    downsample_first = True  # ToyStage merges before its blocks
    arch_zoo = {
        **dict.fromkeys(
            ['t', 'tiny'], {
                'embed_dims': [48, 96, 160, 256],
                'depths': [1, 2, 1, 1],
                'num_heads': [2, 4, 5, 8]
            }),
    }

    def __init__(self, arch='tiny', in_channels: int = 3, **kwargs) -> None:
        super().__init__(arch=arch, in_channels=in_channels, **kwargs)
        self.patch_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dims=self.num_features[0],
            kernel_size=4,
            stride=4,
            padding='corner',
            norm_cfg=self.norm_cfg)
        self.stages = ModuleList([
            ToyStage(
                self.num_features[max(i - 1, 0)], self.num_features[i], depth,
                self.num_heads[i], i > 0, self.drop_path_rates[i], [
                    self.with_fsla and self.has_fsla(i, j, self.num_stages)
                    for j in range(depth)
                ], self.block_cfg) for i, depth in enumerate(self.depths)
        ])
        self._add_output_norms()

    @staticmethod
    def has_fsla(stage: int, block: int, num_stages: int) -> bool:
        return block == 0

    def _embed(self, x):
        return self.patch_embed(x)


BOATToy.published = ToyPublished(
    BOATToy,
    'BOAT-Toy',
    marker='toy_stem.',
    stem=('toy_stem.conv', 'toy_stem.ln'))

# --- The shared checks, on every family. ---

FAMILIES = [*boat_families(), BOATToy]
IDS = [f.family for f in FAMILIES]
ODD = (45, 61)


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    """The toy family is registered (as defining it in a family file
    would) for each test here, and only then."""
    monkeypatch.setitem(base_boat._FAMILIES, BOATToy.family, BOATToy)


def small(family) -> dict:
    """The family's tiny arch with at most two blocks per stage (widths,
    heads and the family's other keys as in its zoo)."""
    arch = dict(family.arch_zoo['tiny'])
    arch['depths'] = [min(d, 2) for d in arch['depths']]
    return arch


def build(family, **kwargs) -> BaseBOATBackbone:
    torch.manual_seed(0)
    model = family(arch=small(family), drop_path_rate=0., **kwargs)
    model.init_weights()
    return model.eval()


def test_toy_is_registered_and_detected():
    assert boat_families()[-1] is BOATToy
    assert BOATToy.published.backbone is BOATToy


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_build_widths_from_the_arch_and_fsla_where_the_family_says(family):
    model = build(family)
    widths = list(family.arch_zoo['tiny']['embed_dims'])
    assert model.num_features == widths
    assert [
        m.weight.shape[0]
        for m in (getattr(model, f'norm{i}') for i in range(4))
    ] == widths
    expected = [(i, j) for i, d in enumerate(model.depths) for j in range(d)
                if family.has_fsla(i, j, 4)]
    assert list(model.fsla_modules()) == expected and expected
    assert family.zoo_name(**family.arch_zoo['tiny']) == 'tiny'


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_forward_odd_size_and_out_indices(family):
    model = build(family)
    x = torch.randn(2, 3, *ODD)
    with torch.no_grad():
        outs = model(x)
    widths = family.arch_zoo['tiny']['embed_dims']
    assert [tuple(o.shape) for o in outs] == [
        (2, w, math.ceil(ODD[0] / 2**(i + 2)), math.ceil(ODD[1] / 2**(i + 2)))
        for i, w in enumerate(widths)
    ]
    # Fewer outputs: the same features (same weights), only those asked.
    some = family(arch=small(family), drop_path_rate=0., out_indices=(1, 3))
    missing, unexpected = some.load_state_dict(
        model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {
        'norm0.weight', 'norm0.bias', 'norm2.weight', 'norm2.bias'
    }
    with torch.no_grad():
        picked = some.eval()(x)
    assert len(picked) == 2
    for got, want in zip(picked, (outs[1], outs[3])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _on_meta(family) -> BaseBOATBackbone:
    with torch.device('meta'):
        return family(arch=small(family), drop_path_rate=0.)


def _buffers_equal(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got, want = dict(got.named_buffers()), dict(want.named_buffers())
    assert got.keys() == want.keys()
    for name, buffer in want.items():
        assert torch.equal(got[name], buffer), name


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
@pytest.mark.parametrize('how', ['to_empty', 'assign', 'init_weights'])
def test_built_on_meta_then_given_values(family, how):
    """Built under ``torch.device('meta')`` (as FSDP and fast loading do),
    the backbone runs on meta tensors, and once given values, by loading
    weights into ``to_empty`` memory, by ``assign=True`` or by
    ``init_weights``, computes what one built on the CPU does: buffers
    outside the checkpoints (Swin's position index) are derived again."""
    ref = build(family)
    x = torch.randn(1, 3, *ODD)
    with torch.no_grad():
        want = ref(x)
    model = _on_meta(family)
    outs = model(torch.empty(1, 3, *ODD, device='meta'))
    assert [o.shape for o in outs] == [w.shape for w in want]
    if how == 'assign':
        model.load_state_dict(ref.state_dict(), assign=True)
    else:
        # Garbage where the buffers were, as uninitialised memory may hold.
        model.to_empty(device='cpu')
        for buffer in model.buffers():
            buffer.fill_(10**6)
        if how == 'init_weights':
            model.init_weights()
            _buffers_equal(model, ref)
            return
        model.load_state_dict(ref.state_dict())
    _buffers_equal(model, ref)
    with torch.no_grad():
        got = model.eval()(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_loading_under_inference_mode_keeps_the_buffers(family):
    """A load under ``torch.inference_mode`` (an inference script that
    later fine-tunes) leaves the buffers the same tensors, not inference
    tensors that training could not save for backward."""
    ref = build(family)
    model = family(arch=small(family), drop_path_rate=0.)
    before = {n: b for n, b in model.named_buffers()}
    with torch.inference_mode():
        model.load_state_dict(ref.state_dict())
    for name, buffer in model.named_buffers():
        assert buffer is before[name] and not buffer.is_inference(), name
    outs = model.train()(torch.randn(1, 3, *ODD))
    sum(o.sum() for o in outs).backward()


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_cast_by_module_type_then_loaded(family):
    """``Module.type`` casts the integer buffers too; a load gives them
    back their dtype and values, as a freshly built module has."""
    ref = build(family)
    model = family(arch=small(family), drop_path_rate=0.).type(torch.float64)
    model.load_state_dict(ref.state_dict())
    _buffers_equal(model, ref)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, *ODD, dtype=torch.float64))


# Doubling widths from an int (16, 32, 64, 128), FSLA where every family
# puts some.
DOUBLING = dict(embed_dims=16, depths=[2, 2, 2, 1], num_heads=[2, 2, 2, 2])


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
@pytest.mark.parametrize(
    'kwargs', [
        dict(),
        dict(out_indices=(3, 1)),
        dict(arch=DOUBLING, out_indices=-1),
        dict(arch=DOUBLING, out_indices=(0, -2)),
        dict(arch='tiny', out_indices=(1, )),
    ],
    ids=['small', 'small-3-1', 'doubling-last', 'doubling-0-2', 'zoo-1'])
def test_output_channels_are_those_of_the_forward(family, kwargs):
    """What the tools check necks and heads against, without building:
    the channels and stages of the maps the built backbone outputs."""
    kwargs = dict(dict(arch=small(family)), **kwargs)
    widths = family.output_channels(**kwargs)
    model = family(drop_path_rate=0., **kwargs).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert list(widths.values()) == [o.shape[1] for o in outs]
    assert tuple(widths) == model.out_indices


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_output_channels_refuse_what_the_backbone_refuses(family):
    for kwargs in (dict(arch='huge'), dict(out_indices=(4, ))):
        with pytest.raises(ValueError) as built:
            family(**kwargs)
        with pytest.raises(ValueError) as computed:
            family.output_channels(**kwargs)
        assert str(computed.value) == str(built.value)


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_layer_depth_follows_the_forward_order(family):
    """A parameter's layer-wise depth is its place in the order in which
    the forward runs the stem, the blocks and the merges (a merge takes
    the depth of the block run before it); output norms and modules
    outside the backbone come last."""
    model = build(family)
    units = {
        name: m
        for name, m in model.named_modules() if name == 'patch_embed'
        or re.fullmatch(r'stages\.\d+\.(blocks\.\d+|downsample)', name)
    }
    order = []
    for name, m in units.items():
        m.register_forward_pre_hook(
            lambda *args, name=name: order.append(name))
    with torch.no_grad():
        model(torch.randn(1, 3, *ODD))
    depth, depths = 0, {}
    for name in order:
        depth += '.blocks.' in name
        depths[name] = depth
    last = depth + 1
    assert depths['patch_embed'] == 0 and last == sum(model.depths) + 1
    for name, _ in model.named_parameters():
        owner = [u for u in depths if name.startswith(u + '.')]
        want = depths[owner[0]] if owner else last
        assert model.get_layer_depth('backbone.' + name,
                                     'backbone.') == (want, last + 1), name
    assert model.get_layer_depth('head.fc.weight',
                                 'backbone.') == (last, last + 1)


def _classifier_state(model, num_classes=5) -> 'OrderedDict[str, Tensor]':
    """Our classifier's weights: ``backbone.*`` (the last output norm, as
    a classifier with ``out_indices=(3, )`` has) and ``head.fc.*``."""
    state = OrderedDict(('backbone.' + k, v)
                        for k, v in model.state_dict().items()
                        if not re.match(r'norm[0-2]\.', k))
    gen = torch.Generator().manual_seed(1)
    state['head.fc.weight'] = torch.randn(
        num_classes, model.num_features[-1], generator=gen)
    state['head.fc.bias'] = torch.randn(num_classes, generator=gen)
    return state


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_published_layout_converts_every_key(family):
    """The family's key map, inverted, gives a file that its layout
    detects and converts back to every key of our classifier (the value
    fixes: as the layout states them; the toy's are checked against an
    independent inverse below)."""
    ours = _classifier_state(build(family))
    layout = family.published
    key_map = layout.key_map(
        dict(depths=small(family)['depths'], with_fsla=True, num_classes=5))
    assert sorted(key_map.values()) == sorted(ours)
    published = {src: ours[dst] for src, dst in key_map.items()}
    info = layout.detect(published)
    assert list(info['embed_dims']) == list(
        family.arch_zoo['tiny']['embed_dims'])
    found, converted = convert_boat_checkpoint({'state_dict': published})
    assert found is family
    assert list(converted) == list(key_map.values())
    for k, v in converted.items():
        assert torch.equal(v, layout.fix_value(k, ours[k])), k
    assert info['with_fsla'] and info['in_channels'] == 3
    assert tuple(info['depths']) == tuple(small(family)['depths'])


def _toy_to_published(ours: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our toy classifier's weights in the toy's published layout, written
    from the layout's description (not from its key map)."""
    names = [(r'backbone\.patch_embed\.projection\.', 'toy_stem.conv.'),
             (r'backbone\.patch_embed\.norm\.', 'toy_stem.ln.'),
             (r'backbone\.norm3\.', 'norm.'), (r'head\.fc\.', 'head.'),
             (r'backbone\.stages\.(\d)\.downsample\.projection\.',
              r'toy_stage\1.down.conv.'),
             (r'backbone\.stages\.(\d)\.downsample\.norm\.',
              r'toy_stage\1.down.ln.')]
    block = [('norm1', 'ln1'), ('attn.w_msa.qkv', 'mix.qkv'),
             ('attn.w_msa.proj', 'mix.out'),
             ('attn.w_msa.relative_position_bias_table', 'mix.table'),
             ('norm_fsla', 'ctx_ln'), ('fsla.qkv', 'ctx.qkv'),
             ('fsla.proj', 'ctx.out'), ('fsla.get_v', 'ctx.dw'),
             ('norm2', 'ln2'), ('ffn.layers.0.0', 'fc1'),
             ('ffn.layers.1', 'fc2')]
    for a, b in block:
        names.append((r'backbone\.stages\.(\d)\.blocks\.(\d)\.' + re.escape(a),
                      rf'toy_stage\1.b\2.{b}'))
    out = {}
    for key, value in ours.items():
        for pattern, repl in names:
            new, n = re.subn('^' + pattern, repl, key)
            if n:
                break
        assert n, key
        out[new] = value.t() if new.endswith('.mix.table') else value
    return out


def test_toy_converter_round_trip():
    model = build(BOATToy)
    ours = _classifier_state(model)
    family, converted = convert_boat_checkpoint(
        {'model': _toy_to_published(ours)})
    assert family is BOATToy
    assert list(converted) == list(ours)
    for k, v in ours.items():
        assert torch.equal(converted[k], v), k
    # And the converted backbone loads strictly into a fresh toy model.
    fresh = BOATToy(arch=small(BOATToy), out_indices=(3, ))
    fresh.load_state_dict({
        k[len('backbone.'):]: v
        for k, v in converted.items() if k.startswith('backbone.')
    })


@pytest.mark.parametrize('family', FAMILIES, ids=IDS)
def test_flops_tool_counts_the_family(family):
    model = build(family)
    info = get_model_complexity(model, input_shape=(3, 48, 48))
    assert info['params'] == sum(p.numel() for p in model.parameters())
    ops = info['by_operator']
    assert ops['fsla_clustering'] > 0 and ops['linear'] > 0
    plain = get_model_complexity(
        build(family, with_fsla=False), input_shape=(3, 48, 48))
    assert 'fsla_clustering' not in plain['by_operator']
    assert plain['flops'] < info['flops']
