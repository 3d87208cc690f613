# Copyright (c) boat-mm contributors. All rights reserved.
"""The COCO-like annotations describe the drawn objects exactly.

The generator is run with its textures replaced by flat images that paint
each object with its own id (after the real texture has drawn its random
numbers, so the scenes are those of the shipped generator), and the images
are captured before JPEG compression. The visible pixels of object ``j``
are then exactly the pixels of value ``j`` in the written image, and every
annotation is checked against them: ``area`` and ``bbox`` exactly, the
category from the appearance the object was drawn with, and the polygons
by exact rules (below).
"""
import json
import os.path as osp
from typing import Dict, List

import cv2
import numpy as np
import pytest

import boat_mm.datasets.synthetic_coco as synthetic_coco
from boat_mm.datasets import generate_coco_like

NUM_CLASSES = 6
SIZE = 96
SEED = 3


@pytest.fixture(scope='module')
def drawn(tmp_path_factory) -> Dict:
    """Generate with id-painted objects; return the annotations, the id
    images and the appearance each object was drawn with."""
    # The class of an object is the index of its appearance in the table
    # the generator builds (by identity: the look-alike pair has equal
    # values in two dicts).
    per_image: List[List[Dict]] = []
    real_render = synthetic_coco.render_texture
    real_write = cv2.imwrite
    images: Dict[str, np.ndarray] = {}

    def render(shape, app, rng):
        real_render(shape, app, rng)  # the same random draws
        if not any(app is t for t in tables):
            per_image.append([])  # the background: a new image
            value = 0
        else:
            per_image[-1].append(app)
            value = len(per_image[-1])
        return np.full(tuple(shape) + (3, ), value, np.float32)

    tables: List[Dict] = []
    real_table = synthetic_coco.class_appearance

    def record_table(*args, **kwargs):
        tables[:] = real_table(*args, **kwargs)
        return tables

    def write(path, img, *args):
        images[osp.basename(osp.dirname(path)) + '/' +
               osp.basename(path)] = img.copy()
        return real_write(path, img, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(synthetic_coco, 'render_texture', render)
    mp.setattr(synthetic_coco, 'class_appearance', record_table)
    mp.setattr(synthetic_coco.cv2, 'imwrite', write)
    try:
        root = generate_coco_like(
            str(tmp_path_factory.mktemp('coco_ids')),
            num_train=24,
            num_val=4,
            img_size=SIZE,
            seed=SEED,
            progress=False)
    finally:
        mp.undo()
    data = {}
    for split in ('train', 'val'):
        with open(
                osp.join(root, 'annotations',
                         f'instances_{split}2017.json')) as f:
            data[split] = json.load(f)
    assert len(tables) == NUM_CLASSES
    return dict(data=data, images=images, objects=per_image, tables=tables)


def _scenes(drawn):
    """(annotations, id image, appearances) per image, in writing order."""
    k = 0
    for split in ('train', 'val'):
        data = drawn['data'][split]
        for img in data['images']:
            anns = [
                a for a in data['annotations'] if a['image_id'] == img['id']
            ]
            ids = drawn['images'][f'{split}2017/{img["file_name"]}']
            yield split, img, anns, ids[..., 0], drawn['objects'][k]
            k += 1


def test_every_drawn_object_has_its_annotation(drawn):
    total = 0
    for split, img, anns, ids, objects in _scenes(drawn):
        assert (img['width'], img['height']) == (SIZE, SIZE)
        # The flat ids survive (no object drawn with another's value).
        assert set(np.unique(ids)) <= set(range(len(objects) + 1))
        # One annotation per object that is visible, in drawing order.
        visible = [j + 1 for j in range(len(objects)) if (ids == j + 1).any()]
        assert len(anns) == len(visible), (split, img['id'])
        total += len(anns)
    assert total >= 60


def test_area_and_bbox_are_those_of_the_visible_pixels(drawn):
    for split, img, anns, ids, objects in _scenes(drawn):
        for j, ann in enumerate(anns):
            visible = ids == j + 1
            ys, xs = np.nonzero(visible)
            assert ann['area'] == len(xs), (split, img['id'], j)
            # COCO boxes are [x, y, w, h] in continuous coordinates where
            # pixel (x, y) covers [x, x + 1) x [y, y + 1): the box of the
            # visible pixels.
            assert ann['bbox'] == [
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1)
            ], (split, img['id'], j)
            assert ann['iscrowd'] == 0


def test_category_is_the_class_drawn(drawn):
    tables = drawn['tables']
    seen = set()
    for split, img, anns, ids, objects in _scenes(drawn):
        for ann, app in zip(anns, objects):
            k = next(i for i, t in enumerate(tables) if t is app)
            assert ann['category_id'] == k + 1, (split, img['id'])
            seen.add(k)
    assert seen == set(range(NUM_CLASSES))


def _shoelace(poly: List[int]) -> int:
    """Twice the area enclosed by an integer polygon (exact)."""
    pts = np.asarray(poly, np.int64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    return abs(int((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()))


def test_polygons_are_the_visible_pixels(drawn):
    """Decoded as mmdet decodes them (pycocotools), the polygons give
    exactly the visible pixels; they run along pixel edges (integer
    corners in COCO coordinates, where pixel ``(x, y)`` covers ``[x, x +
    1) x [y, y + 1)``), so they enclose exactly ``area`` pixels and their
    extent is the box."""
    from pycocotools import mask as mask_utils
    for split, img, anns, ids, objects in _scenes(drawn):
        for j, ann in enumerate(anns):
            where = (split, img['id'], j)
            visible = ids == j + 1
            polys = ann['segmentation']
            assert polys and all(
                len(p) >= 6 and len(p) % 2 == 0 and all(
                    isinstance(v, int) for v in p) for p in polys), where
            rles = mask_utils.frPyObjects(polys, SIZE, SIZE)
            decoded = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
            np.testing.assert_array_equal(decoded, visible, err_msg=str(where))
            # The pieces are disjoint: their enclosed areas add up.
            assert sum(_shoelace(p) for p in polys) == 2 * ann['area'], where
            pts = np.concatenate([np.reshape(p, (-1, 2)) for p in polys])
            x, y, w, h = ann['bbox']
            assert pts.min(0).tolist() == [x, y], where
            assert pts.max(0).tolist() == [x + w, y + h], where


def test_outlines_of_hand_made_pieces():
    """Where the scenes rarely go (several pieces, a single pixel, pieces
    touching at a corner only, a notch open to the border): the same
    exact rules."""
    from pycocotools import mask as mask_utils
    mask = np.zeros((7, 9), bool)
    mask[0, 0] = True  # a single pixel in the corner
    mask[2:5, 2:4] = True  # a block ...
    mask[5, 4] = True  # ... and a pixel touching it at a corner
    mask[1:7, 6:9] = True  # a piece on two borders ...
    mask[3, 7:9] = False  # ... with a notch open to the right border
    polys = synthetic_coco._pixel_outlines(mask)
    assert len(polys) == 3  # 8-connected pieces
    decoded = mask_utils.decode(
        mask_utils.merge(mask_utils.frPyObjects(polys, 7, 9))).astype(bool)
    np.testing.assert_array_equal(decoded, mask)
    assert sum(_shoelace(p) for p in polys) == 2 * mask.sum()
    corners = [set(map(tuple, np.reshape(p, (-1, 2)).tolist())) for p in polys]
    assert {(0, 0), (1, 0), (1, 1), (0, 1)} in corners
