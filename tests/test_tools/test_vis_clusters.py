# Copyright (c) boat-mm contributors. All rights reserved.
"""Capturing and drawing FSLA clusters (boat_mm.visualization and
tools/visualization/vis_clusters.py), with tiny BOAT archs."""
import math
import os.path as osp
import runpy

import cv2
import mmcv
import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from boat_mm.models import BOATCSWin, BOATSwin, boat_families
from boat_mm.ops.clustering import num_clusters_for
from boat_mm.visualization import (capture_cluster_ids, cluster_palette,
                                   colorize_ids, draw_clusters,
                                   find_fsla_modules, get_boat_backbone,
                                   upsample_ids)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_SEG = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
SWIN_CLS = osp.join(REPO, 'configs', 'boat_swin',
                    'boat-swin-tiny_16xb64_in1k.py')
FSLA_CFG = dict(group_size=16, overlap=4)
# ImageNet mean/std (RGB) of the mmpretrain dataset base.
MEAN = np.float32([123.675, 116.28, 103.53])
STD = np.float32([58.395, 57.12, 57.375])


def _balanced_sizes(num_tokens: int, group_size: int) -> list:
    """Cluster sizes the clustering promises: G clusters whose sizes
    differ by at most one token."""
    G = num_clusters_for(num_tokens, group_size)
    q, r = divmod(num_tokens, G)
    return sorted([q + 1] * r + [q] * (G - r))


CSWIN_ARCH = dict(embed_dims=8, depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 2))
SWIN_ARCH = dict(embed_dims=8, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 2))


@pytest.mark.parametrize('backbone_cls, arch, expected', [
    (BOATCSWin, CSWIN_ARCH, [(0, 0), (1, 0), (2, 0), (3, 0)]),
    (BOATSwin, SWIN_ARCH, [(0, 1), (1, 1), (2, 1)]),
])
def test_capture_shapes_and_balanced_clusters(backbone_cls, arch, expected):
    torch.manual_seed(0)
    backbone = backbone_cls(
        arch=arch, fsla_cfg=FSLA_CFG, drop_path_rate=0.).train()
    assert list(find_fsla_modules(backbone)) == expected
    # 58 x 74 is no multiple of the strides: stage maps are 15x19 (285
    # tokens, 16 unequal clusters), 8x10 (4 clusters), 4x5 (one cluster).
    x = torch.randn(2, 3, 58, 74)
    with torch.no_grad():
        ref = backbone.eval()(x)
    backbone.train()
    ids = capture_cluster_ids(backbone, x)
    assert list(ids) == expected
    for (stage, block), got in ids.items():
        h, w = math.ceil(58 / 2**(stage + 2)), math.ceil(74 / 2**(stage + 2))
        heads = arch['num_heads'][stage]
        assert got.shape == (2, heads, h, w) and got.dtype == torch.long
        sizes = _balanced_sizes(h * w, FSLA_CFG['group_size'])
        for sample in range(2):
            for head in range(heads):
                counts = torch.bincount(got[sample, head].flatten())
                # Every id in [0, G) occurs, with the promised sizes.
                assert sorted(counts.tolist()) == sizes
    assert len(_balanced_sizes(15 * 19, 16)) == 16  # the map is non-trivial
    # The hooks are gone, the output is untouched, the mode restored.
    assert backbone.training
    assert all(not m._forward_pre_hooks for m in backbone.modules())
    with torch.no_grad():
        out = backbone.eval()(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_capture_errors():
    backbone = BOATCSWin(arch=CSWIN_ARCH, fsla_cfg=FSLA_CFG)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError) as err:
        capture_cluster_ids(backbone, x, [(0, 1)])
    assert 'Stage 0, block 1 has no FSLA module' in str(err.value)
    assert '(stage 0, block 0), (stage 1, block 0)' in str(err.value)
    no_fsla = BOATSwin(
        arch=dict(embed_dims=8, depths=(2, 2), num_heads=(1, 2)),
        out_indices=(1, ),
        with_fsla=False)
    with pytest.raises(ValueError, match='with_fsla=False'):
        capture_cluster_ids(no_fsla, x)

    model = nn.Module()
    model.backbone = nn.Conv2d(3, 8, 3)
    with pytest.raises(TypeError, match='Conv2d, not a BOAT backbone'):
        capture_cluster_ids(model, x)
    model.backbone = backbone  # a model holding a BOAT backbone is fine
    assert get_boat_backbone(model) is backbone


def test_palette_colorize_and_draw():
    palette = cluster_palette(300)
    assert palette.shape == (300, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 300
    ids = np.array([[0, 1], [2, 0]])
    np.testing.assert_array_equal(colorize_ids(ids), cluster_palette(3)[ids])
    # Stride 4 over a 7 x 6 image: token (r, c) covers 4x4 pixels, cut at
    # the bottom/right; without a stride the map is stretched.
    np.testing.assert_array_equal(
        upsample_ids(ids, (7, 6), stride=4),
        np.repeat(np.repeat(ids, 4, 0), 4, 1)[:7, :6])
    np.testing.assert_array_equal(
        upsample_ids(ids, (4, 4)), np.repeat(np.repeat(ids, 2, 0), 2, 1))
    image = np.full((7, 6, 3), 100, np.uint8)
    picture = draw_clusters(image, ids, alpha=0.25, stride=4)
    assert picture.shape == (7, 12, 3)
    np.testing.assert_array_equal(picture[:, :6], image)
    colour = cluster_palette(3)[2].astype(np.float64)
    np.testing.assert_array_equal(picture[5, 6 + 1],
                                  np.rint(100 * 0.75 + colour * 0.25))
    with pytest.raises(ValueError, match=r'\(H, W\) id map'):
        colorize_ids(np.zeros((1, 2, 2), int))


@pytest.fixture(scope='module')
def tool():
    """The tool's functions; ``main`` raises its errors (the one-line
    report of its decorator is tested in test_cli_manner.py)."""
    module = runpy.run_path(
        osp.join(REPO, 'tools', 'visualization', 'vis_clusters.py'),
        run_name='vis_clusters')
    return dict(module, main=module['main'].__wrapped__)


@pytest.fixture(scope='module')
def image_file(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img[16:48, 16:48] = (20, 200, 40)  # an object to cluster
    path = str(tmp_path_factory.mktemp('vis') / 'img.png')
    cv2.imwrite(path, img)
    return path


# The demo segmentation config with a tiny arch, from the command line.
SEG_OPTIONS = [
    '--cfg-options', 'model.backbone.arch.embed_dims=8',
    'model.backbone.arch.depths=[2,1,1,1]',
    'model.backbone.arch.num_heads=[2,2,2,2]',
    'model.backbone.fsla_cfg.group_size=16',
    'model.backbone.fsla_cfg.overlap=4',
    'model.decode_head.in_channels=[8,16,32,64]',
    'model.decode_head.channels=8', 'model.auxiliary_head.in_channels=32',
    'model.auxiliary_head.channels=8'
]


def test_tool_segmentation_config(tool, image_file, tmp_path):
    out_file = str(tmp_path / 'out' / 'clusters.png')
    res = tool['main']([
        DEMO_SEG, image_file, '--shape', '58', '74', '--alpha', '1', '--head',
        '1', '--out-file', out_file, *SEG_OPTIONS
    ])
    assert res['location'] == (0, 0)  # the first FSLA block of stage 0
    # The image the model saw: resized to 74 x 58 (bilinear, as mmcv's).
    expected = mmcv.imresize(mmcv.imread(image_file), (74, 58))
    np.testing.assert_array_equal(res['image'], expected)
    ids = res['ids']
    assert ids.shape == (15, 19)
    assert sorted(np.bincount(ids.ravel())) == _balanced_sizes(285, 16)

    # Enlarged 4x (to >= 512 px) under a title band.
    assert res['scale'] == 4 and res['title'] == (
        'stage 0, block 0, head 1: 16 clusters of 15x19 tokens (58x74 '
        'input)')
    full = cv2.imread(out_file)
    band = full.shape[0] - 4 * 58
    assert full.shape[1] == 4 * 2 * 74 >= 512 and 0 < band < 60
    assert (full[:band] < 128).any()  # the title's text
    body = full[band:]
    picture = body[::4, ::4]
    np.testing.assert_array_equal(
        body, np.repeat(np.repeat(picture, 4, 0), 4, 1))
    np.testing.assert_array_equal(picture[:, :74], expected)
    # alpha=1: pure colours, constant over each token's 4x4 pixels, one
    # distinct colour per cluster.
    colours = picture[:, 74:]
    per_token = colours[::4, ::4]
    np.testing.assert_array_equal(
        colours,
        np.repeat(np.repeat(per_token, 4, 0), 4, 1)[:58, :74])
    pairs = {(i, tuple(c))
             for i, c in zip(ids.ravel(), per_token.reshape(-1, 3))}
    assert len(pairs) == len({i for i, _ in pairs}) == \
        len({c for _, c in pairs}) == 16


def test_tool_classification_config_with_checkpoint(tool, image_file,
                                                    tmp_path):
    cfg_file = tmp_path / 'tiny_swin.py'
    cfg_file.write_text(f"""
_base_ = [{SWIN_CLS!r}]
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=8, depths=[2, 2, 2, 1],
                  num_heads=[1, 2, 2, 2]),
        fsla_cfg=dict(group_size=16, overlap=4), drop_path_rate=0.0),
    head=dict(in_channels=64, num_classes=6))
""")
    model = tool['build_model'](Config.fromfile(str(cfg_file)))
    ckpt = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict()}, ckpt)

    out_file = str(tmp_path / 'cls.png')
    res = tool['main']([
        str(cfg_file), image_file, '--checkpoint', ckpt, '--stage', '1',
        '--out-file', out_file
    ])
    assert res['location'] == (1, 1)
    # The config's test pipeline: resize the short edge to 256, crop 224.
    assert res['image'].shape == (224, 224, 3)
    full = cv2.imread(out_file)
    assert res['scale'] == 2 and full.shape[1] == 896
    assert full.shape[0] - 448 < 60
    # The same clusters from the saved weights and a hand-normalised input
    # (BGR -> RGB, ImageNet mean/std): the checkpoint was loaded.
    rgb = res['image'][..., ::-1].astype(np.float32)
    x = torch.from_numpy((rgb - MEAN) / STD).permute(2, 0, 1)[None]
    ref = capture_cluster_ids(model, x, [(1, 1)])[(1, 1)][0, 0]
    np.testing.assert_array_equal(res['ids'], ref.numpy())
    assert res['ids'].shape == (28, 28)


def test_tool_errors(tool, image_file, tmp_path):
    out = ['--out-file', str(tmp_path / 'x.png'), '--shape', '32']
    with pytest.raises(ValueError) as err:
        tool['main'](
            [DEMO_SEG, image_file, '--block', '1', *out, *SEG_OPTIONS])
    assert 'Stage 0, block 1 has no FSLA module. FSLA is in: (stage 0, ' \
        'block 0), (stage 1, block 0), (stage 2, block 0), (stage 3, ' \
        'block 0); choose one with --stage and --block.' in str(err.value)
    with pytest.raises(ValueError, match='has 2 heads'):
        tool['main']([DEMO_SEG, image_file, '--head', '2', *out, *SEG_OPTIONS])
    # A user config swapping in an mmseg backbone.
    other = tmp_path / 'mit.py'
    other.write_text(f"""
_base_ = [{DEMO_SEG!r}]
model = dict(backbone=dict(
    _delete_=True, type='MixVisionTransformer', embed_dims=8,
    num_layers=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]))
""")
    with pytest.raises(TypeError) as err:
        tool['main']([str(other), image_file, *out])
    names = ' or '.join(f.__name__ for f in boat_families())
    assert 'The backbone is a MixVisionTransformer, not a BOAT backbone ' \
        f'({names})' in str(err.value)
    assert {'BOATSwin', 'BOATCSWin', 'configs/boat_swin',
            'configs/boat_cswin'} <= set(str(err.value).replace(
                ',', ' ').replace(')', ' ').replace('(', ' ').split())
    with pytest.raises(FileNotFoundError, match='image'):
        tool['main']([DEMO_SEG, str(tmp_path / 'missing.png'), *out])
    assert not osp.exists(tmp_path / 'x.png')
