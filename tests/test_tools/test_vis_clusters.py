# Copyright (c) boat-mm contributors. All rights reserved.
"""tools/visualization/vis_clusters.py, with tiny BOAT archs (the library:
tests/test_visualization/test_clusters.py)."""
import os.path as osp
import runpy

import cv2
import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config
from tiny_configs import SEG_OPTIONS, swin_classifier

from boat_mm.models import boat_families
from boat_mm.ops.clustering import num_clusters_for
from boat_mm.visualization import capture_cluster_ids

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_SEG = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
SWIN_CLS = osp.join(REPO, 'configs', 'boat_swin',
                    'boat-swin-tiny_16xb64_in1k.py')
# ImageNet mean/std (RGB) of the mmpretrain dataset base.
MEAN = np.float32([123.675, 116.28, 103.53])
STD = np.float32([58.395, 57.12, 57.375])


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
    # Balanced: G clusters whose sizes differ by at most one token.
    sizes = np.bincount(ids.ravel())
    assert len(sizes) == num_clusters_for(285, 16)
    assert sizes.min() >= sizes.max() - 1

    # Enlarged 4x (to >= 512 px) under a title band.
    assert res['scale'] == 4 and res['title'] == (
        'stage 0, block 0, head 1: a 15x19 map (285 tokens) in 16 clusters '
        '(58x74 input)')
    full = cv2.imread(out_file)
    band = full.shape[0] - 4 * 58
    assert full.shape[1] == 4 * 2 * 74 >= 512 and 0 < band < 60
    assert (full[:band] < 128).any()  # the title's text
    body = full[band:]
    picture = body[::4, ::4]
    np.testing.assert_array_equal(body,
                                  np.repeat(np.repeat(picture, 4, 0), 4, 1))
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


def test_tool_min_width(tool, image_file, tmp_path):
    # Image and clusters side by side are 2 x 74 = 148 px wide: the
    # smallest whole factor reaching 300 px is 3 (the default, 512: 4).
    out_file = str(tmp_path / 'wide.png')
    res = tool['main']([
        DEMO_SEG, image_file, '--shape', '58', '74', '--min-width', '300',
        '--out-file', out_file, *SEG_OPTIONS
    ])
    full = cv2.imread(out_file)
    assert res['scale'] == 3 and full.shape[1] == 3 * 148
    assert full.shape[0] - 3 * 58 < 60


def test_tool_classification_config_with_checkpoint(tool, image_file,
                                                    tmp_path):
    cfg_file = tmp_path / 'tiny_swin.py'
    cfg_file.write_text(swin_classifier(SWIN_CLS))
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
    assert {
        'BOATSwin', 'BOATCSWin', 'configs/boat_swin', 'configs/boat_cswin'
    } <= set(
        str(err.value).replace(',', ' ').replace(')',
                                                 ' ').replace('(',
                                                              ' ').split())
    with pytest.raises(FileNotFoundError, match='image'):
        tool['main']([DEMO_SEG, str(tmp_path / 'missing.png'), *out])
    assert not osp.exists(tmp_path / 'x.png')
