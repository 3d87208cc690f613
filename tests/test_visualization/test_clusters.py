# Copyright (c) boat-mm contributors. All rights reserved.
"""Capturing and drawing FSLA clusters (boat_mm/visualization/clusters.py),
with tiny BOAT archs. The command line: tests/test_tools/test_vis_clusters.py.
"""
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from boat_mm.models import BOATCSWin, BOATSwin
from boat_mm.ops.clustering import num_clusters_for
from boat_mm.visualization import (capture_cluster_ids, cluster_palette,
                                   colorize_ids, draw_clusters,
                                   find_fsla_modules, get_boat_backbone,
                                   upsample_ids)

FSLA_CFG = dict(group_size=16, overlap=4)


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
    # Up to 384 colours pairwise distinct, one brightness per 128 ids.
    palette = cluster_palette(384)
    assert len({tuple(c) for c in palette}) == 384
    hsv = cv2.cvtColor(palette[None], cv2.COLOR_BGR2HSV)[0].astype(int)
    assert (np.diff(hsv[:, 2].reshape(3, 128).mean(1)) < -50).all()
    # Sibling clusters (2j, 2j + 1) get opposite hues (OpenCV's hue is
    # 0-179: opposite is 90 apart; the round trip through BGR moves a hue
    # by a few units).
    gap = np.abs(hsv[0::2, 0] - hsv[1::2, 0])
    gap = np.minimum(gap, 180 - gap)
    assert gap.min() >= 85, gap.min()
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


def test_palette_and_drawing_refuse_bad_arguments():
    ids = np.array([[0, 1], [2, 0]])
    image = np.zeros((4, 4, 3), np.uint8)
    for call, match in [
        (lambda: cluster_palette(0), 'num_colors must be >= 1, got 0'),
        (lambda: colorize_ids(-ids), 'Cluster ids must be >= 0, got -2'),
        (lambda: colorize_ids(ids, num_ids=2),
         'num_ids=2 but the map holds id 2'),
        (lambda: draw_clusters(image[..., 0], ids),
         r'Expected an \(H, W, 3\) image, got \(4, 4\)'),
        (lambda: draw_clusters(image, ids, alpha=1.5),
         r'alpha must be in \[0, 1\], got 1.5'),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    # A palette larger than the map's ids (maps that share colours).
    np.testing.assert_array_equal(
        colorize_ids(torch.tensor(ids), num_ids=5),
        cluster_palette(5)[ids])
