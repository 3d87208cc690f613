# Copyright (c) boat-mm contributors. All rights reserved.
"""The SimMIM variants of the BOAT families (boat_mm/models/selfsup)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from boat_mm.models import BOATCSWin, BOATSwin, SimMIMBOATCSWin, SimMIMBOATSwin
from boat_mm.registry import MODELS

ROOT = osp.dirname(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
SWIN_ARCH = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
CSWIN_ARCH = dict(embed_dims=8, depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2))
VARIANTS = [
    pytest.param(SimMIMBOATSwin, BOATSwin, SWIN_ARCH, id='swin'),
    pytest.param(SimMIMBOATCSWin, BOATCSWin, CSWIN_ARCH, id='cswin'),
]
FINE_TUNED_224 = ('configs/boat_swin/boat-swin-base-w7_simmim-100e-pre_'
                  '8xb256-coslr-100e_in1k.py')
CONFIGS = {
    'swin':
    'configs/boat_swin/'
    'simmim_boat-swin-base-w6_8xb256-amp-coslr-100e_in1k-192px.py',
    'cswin':
    'configs/boat_cswin/'
    'simmim_boat-cswin-base_8xb256-amp-coslr-100e_in1k-192px.py',
}


def _build(cls, arch, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(arch=arch, drop_path_rate=0., **kwargs)
    model.init_weights()
    return model.eval()


def _mask(batch, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, h, w, generator=g) < 0.6).long()


def _first_stage_input(model, x, mask):
    seen = []
    hook = model.stages[0].register_forward_pre_hook(
        lambda _, args: seen.append(args[0].clone()))
    try:
        model(x, mask)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize('variant, family, arch', VARIANTS)
def test_without_mask_it_is_the_family_backbone(variant, family, arch):
    model = _build(variant, arch, out_indices=(0, 3))
    plain = family(arch=arch, drop_path_rate=0., out_indices=(0, 3)).eval()
    missing, unexpected = plain.load_state_dict(
        model.state_dict(), strict=False)
    assert missing == [] and unexpected == ['mask_token']
    x = torch.randn(2, 3, 44, 52)
    with torch.no_grad():
        ours, theirs = model(x), plain(x)
        ours_none = model(x, None)
    assert len(ours) == 2
    for a, b, c in zip(ours, theirs, ours_none):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize('variant, family, arch', VARIANTS)
def test_masked_tokens_are_the_mask_token(variant, family, arch):
    model = _build(variant, arch)
    x = torch.randn(2, 3, 40, 48)
    mask = _mask(2, 10, 12)
    with torch.no_grad():
        tokens = _first_stage_input(model, x, mask)
        embedded, hw_shape = model._embed(x)
    assert hw_shape == (10, 12)
    masked = mask.flatten(1).bool()
    expected = torch.where(masked[..., None],
                           model.mask_token.expand_as(embedded), embedded)
    assert masked.any() and (~masked).any()
    assert torch.equal(tokens, expected)
    # The mask token is learned: it gets a gradient through the stages.
    model.train()
    sum(o.sum() for o in model(x, mask)).backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_swin_image_under_masked_patches_is_not_seen():
    """BOAT-Swin's 4x4 patches do not overlap: what the image holds under
    masked patches changes nothing; under an unmasked one, the output."""
    model = _build(SimMIMBOATSwin, SWIN_ARCH)
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, 2:5, 3:7] = 1
    changed = x.clone()
    changed[..., 8:20, 12:28] = torch.randn(1, 3, 12, 16)
    with torch.no_grad():
        for a, b in zip(model(x, mask), model(changed, mask)):
            assert torch.equal(a, b)
        changed[..., 0:4, 0:4] += 1.
        assert not torch.equal(model(x, mask)[-1], model(changed, mask)[-1])


def test_swin_dropout_follows_the_masking():
    """``drop_after_pos`` applies to the mask tokens too, as in mmpretrain's
    SimMIM Swin (the masking comes first)."""
    model = _build(SimMIMBOATSwin, SWIN_ARCH, drop_rate=0.5).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.ones(2, 8, 8, dtype=torch.long)
    tokens = _first_stage_input(model, x, mask)
    token = model.mask_token.detach()[0, 0]
    assert torch.all((tokens == 0) | torch.isclose(tokens, 2 * token))
    assert (tokens == 0).any()


@pytest.mark.parametrize('variant, family, arch', VARIANTS)
def test_mask_of_another_resolution_is_refused(variant, family, arch):
    model = _build(variant, arch)
    with pytest.raises(
            ValueError,
            match=r'mask has shape \(2, 16, 16\), but the stem '
            r'gives 2 x 8 x 8 patch tokens.*resolution, 8 x 8 '
            r'\(SimMIMMaskGenerator: model_patch_size=4'):
        model(torch.randn(2, 3, 32, 32), _mask(2, 16, 16))
    # Transposed (10 x 12 tokens): the right size, the wrong patches.
    with pytest.raises(ValueError, match=r'mask has shape \(2, 12, 10\)'):
        model(torch.randn(2, 3, 40, 48), _mask(2, 12, 10))
    # Flat masks of the right length pass.
    model(torch.randn(2, 3, 40, 48), _mask(2, 10, 12).flatten(1))


def test_mask_error_gives_the_stem_stride():
    """A BOAT-Swin stem of 8-pixel patches asks for SimMIM masks of
    ``model_patch_size=8``."""
    model = _build(SimMIMBOATSwin, SWIN_ARCH, patch_size=8)
    with pytest.raises(
            ValueError,
            match=r'stem gives 2 x 4 x 4 patch tokens.*'
            r'model_patch_size=8 '):
        model(torch.randn(2, 3, 32, 32), _mask(2, 8, 8))
    assert model(torch.randn(2, 3, 32, 32), _mask(2, 4, 4))[-1].shape[0] == 2


@pytest.mark.parametrize('variant, family, arch', VARIANTS)
def test_mask_token_init_and_pretrained(variant, family, arch, tmp_path):
    # Truncated normal, std 0.02, not the zeros it is created with: on a
    # backbone 64 wide (64 samples: the std within 0.012-0.028 by far).
    wide = _build(variant, dict(arch, embed_dims=64))
    token = wide.mask_token.detach()
    assert token.numel() == 64 and 0.012 < token.std() < 0.028
    model = _build(variant, arch)
    # A Pretrained init_cfg with a mask token overrides the initial one.
    other = _build(variant, arch, seed=5)
    path = str(tmp_path / 'pre.pth')
    torch.save({'state_dict': other.state_dict()}, path)
    loaded = _build(
        variant, arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    assert torch.equal(loaded.mask_token, other.mask_token)
    assert not torch.equal(loaded.mask_token, model.mask_token)


@pytest.mark.parametrize('variant, family, arch', VARIANTS)
def test_default_output_is_the_last_stage(variant, family, arch):
    """SimMIM decodes the first output (``latent[0]``): without
    ``out_indices`` the variants output the last stage alone, as
    mmpretrain's ``SimMIMSwinTransformer``, and the tools, which read the
    outputs' widths without building, say the same."""
    model = _build(variant, arch)
    outs = model(torch.randn(1, 3, 64, 64))
    last = _build(family, arch, out_indices=(3, ))(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [o.shape for o in last]
    assert outs[0].shape[1] == arch['embed_dims'] * 8
    assert variant.output_channels(arch=arch) == {3: arch['embed_dims'] * 8}
    assert family.output_channels(arch=arch) == {
        i: arch['embed_dims'] * 2**i
        for i in range(4)
    }


def test_unknown_argument_names_the_accepted_ones():
    with pytest.raises(TypeError, match='window_siz.*window_size'):
        SimMIMBOATSwin(arch=SWIN_ARCH, window_siz=6)


@pytest.mark.parametrize('variant, family, arch', VARIANTS)
def test_simmim_config_trains_and_fine_tunes(variant, family, arch, tmp_path):
    """The shipped config's SimMIM (mmpretrain's algorithm, decoder and
    loss) on the variant with a tiny arch: a finite loss, gradients in
    FSLA and the mask token; its checkpoint then initialises the family's
    backbone through ``init_cfg`` for fine-tuning, weight for weight."""
    from mmpretrain.datasets.transforms import SimMIMMaskGenerator
    from mmpretrain.structures import DataSample
    name = 'swin' if variant is SimMIMBOATSwin else 'cswin'
    cfg = Config.fromfile(osp.join(ROOT, CONFIGS[name]))
    assert cfg.model.backbone.type == variant.__name__
    init_default_scope('mmpretrain')
    cfg.model.backbone.arch = arch
    cfg.model.neck.in_channels = arch['embed_dims'] * 8
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    generator = SimMIMMaskGenerator(
        input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    samples = []
    for _ in range(2):
        sample = DataSample()
        sample.set_mask(torch.from_numpy(generator({})['mask']))
        samples.append(sample)
    loss = model.loss(torch.randn(2, 3, 64, 64), samples)['loss']
    assert torch.isfinite(loss)
    loss.backward()
    backbone = model.backbone
    assert backbone.mask_token.grad.abs().sum() > 0
    fsla = list(backbone.fsla_modules().values())
    assert fsla and all(m.qkv.weight.grad.abs().sum() > 0 for m in fsla)
    path = str(tmp_path / 'simmim.pth')
    torch.save({'state_dict': model.state_dict()}, path)
    # The pre-training's window size, so that every weight loads as it is
    # (another resizes BOAT-Swin's position tables: test_finetune_sources).
    same = {k: v for k, v in cfg.model.backbone.items() if k == 'window_size'}
    tuned = family(
        arch=arch,
        out_indices=(3, ),
        **same,
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    tuned.init_weights()
    theirs = backbone.state_dict()
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    if name == 'swin':
        # The 224 px fine-tuning's windows of 7: the tables of windows of
        # 6 (11 x 11 offsets) resized bicubically to 13 x 13, the rest as
        # it is.
        ft = Config.fromfile(osp.join(ROOT, FINE_TUNED_224)).model.backbone
        assert ft.window_size == 7
        tuned = family(
            arch=arch,
            out_indices=(3, ),
            window_size=ft.window_size,
            init_cfg=dict(
                type='Pretrained', checkpoint=path, prefix='backbone.'))
        tuned.init_weights()
        tables = 0
        for key, value in tuned.state_dict().items():
            if key.endswith('relative_position_bias_table'):
                heads = value.shape[1]
                grid = theirs[key].t().reshape(1, heads, 11, 11)
                want = torch.nn.functional.interpolate(
                    grid, size=(13, 13), mode='bicubic', align_corners=False)
                assert torch.equal(value, want.reshape(heads, 169).t()), key
                tables += 1
            else:
                assert torch.equal(value, theirs[key]), key
        assert tables == sum(arch['depths'])
