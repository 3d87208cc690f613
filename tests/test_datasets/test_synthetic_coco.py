# Copyright (c) boat-mm contributors. All rights reserved.
"""The generated COCO-like data: layout, meaning, determinism, mmdet."""
import filecmp
import json
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest

from boat_mm.datasets import (COCO_CATEGORIES, class_appearance,
                              generate_coco_like)

NUM_CLASSES = 6
SIZE = 96


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp('coco')
    return generate_coco_like(
        str(out),
        num_train=24,
        num_val=4,
        img_size=SIZE,
        seed=3,
        progress=False)


def _load(root: str, split: str) -> dict:
    with open(osp.join(root, 'annotations', f'instances_{split}2017.json')) \
            as f:
        return json.load(f)


def _raster(ann: dict, h: int, w: int) -> np.ndarray:
    """The annotation's polygons rasterised by pycocotools (as mmdet)."""
    from pycocotools import mask as mask_utils
    rles = mask_utils.frPyObjects(ann['segmentation'], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_layout_and_categories(coco_root):
    for split, count in (('train', 24), ('val', 4)):
        data = _load(coco_root, split)
        assert [c['id'] for c in data['categories']] == list(range(1, 7))
        assert [c['name'] for c in data['categories']
                ] == [name for _, name, _ in COCO_CATEGORIES[:NUM_CLASSES]]
        assert len(data['images']) == count
        for img in data['images']:
            path = osp.join(coco_root, f'{split}2017', img['file_name'])
            assert cv2.imread(path).shape == (SIZE, SIZE, 3)
        ids = [a['id'] for a in data['annotations']]
        assert len(set(ids)) == len(ids)


def test_annotations_describe_the_pixels(coco_root):
    """Each instance's polygons cover pixels of its class's colour; bbox
    and area agree with the rasterised polygons; instances do not
    overlap; some are partly hidden by others (touching masks)."""
    data = _load(coco_root, 'train')
    colors = np.stack([t['color'] for t in class_appearance(NUM_CLASSES, 3)])
    touching = 0
    for img in data['images']:
        image = cv2.cvtColor(
            cv2.imread(osp.join(coco_root, 'train2017', img['file_name'])),
            cv2.COLOR_BGR2RGB).astype(np.float32)
        anns = [a for a in data['annotations'] if a['image_id'] == img['id']]
        assert anns
        masks = []
        for ann in anns:
            mask = _raster(ann, SIZE, SIZE)
            masks.append(mask)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann['bbox']
            # Vertices on the outer pixels, simplified within 0.7 px: the
            # rasterised outline lies within 2 px of the pixel extent.
            assert abs(xs.min() - x) <= 2 and abs(ys.min() - y) <= 2
            assert abs(xs.max() + 1 - (x + w)) <= 2
            assert abs(ys.max() + 1 - (y + h)) <= 2
            assert 0.6 * ann['area'] <= mask.sum() <= 1.1 * ann['area']
            inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3)))
            if inner.sum() >= 20:
                # The nearest class colour is the annotated class's (the
                # look-alike pair shares one colour).
                mean = image[inner.astype(bool)].mean(0)
                dist = np.linalg.norm(colors - mean, axis=1)
                k = ann['category_id'] - 1
                assert dist[k] == dist.min() and dist[k] < 60, (k, dist)
        for i in range(len(masks)):
            for j in range(i):
                assert (masks[i] & masks[j]).sum() <= 2
                grown = cv2.dilate(masks[i].astype(np.uint8), np.ones(
                    (3, 3))).astype(bool)
                touching += bool((grown & masks[j]).any())
    assert touching >= 3


def test_look_alikes_are_told_apart_by_the_marker(coco_root):
    """Classes 4 and 5 (COCO ids) look the same; 4 only in images with a
    marker (id 6), 5 only in images without; the marker touches nothing."""
    data = _load(coco_root, 'train')
    table = class_appearance(NUM_CLASSES, 3)
    np.testing.assert_array_equal(table[3]['color'], table[4]['color'])
    seen = set()
    for img in data['images']:
        anns = [a for a in data['annotations'] if a['image_id'] == img['id']]
        cats = {a['category_id'] for a in anns}
        has_marker = 6 in cats
        assert not (4 in cats and not has_marker)
        assert not (5 in cats and has_marker)
        seen |= cats & {4, 5}
        for marker in (a for a in anns if a['category_id'] == 6):
            grown = cv2.dilate(
                _raster(marker, SIZE, SIZE).astype(np.uint8), np.ones(
                    (5, 5))).astype(bool)
            for other in anns:
                if other is not marker:
                    assert not (grown & _raster(other, SIZE, SIZE)).any()
    assert seen == {4, 5}


def test_deterministic_from_seed(coco_root, tmp_path):
    again = generate_coco_like(
        str(tmp_path / 'a'),
        num_train=24,
        num_val=4,
        img_size=SIZE,
        seed=3,
        progress=False)
    other = generate_coco_like(
        str(tmp_path / 'b'),
        num_train=24,
        num_val=4,
        img_size=SIZE,
        seed=4,
        progress=False)
    for rel in ('annotations/instances_train2017.json',
                'annotations/instances_val2017.json',
                'train2017/000000000001.jpg', 'val2017/000000000004.jpg'):
        assert filecmp.cmp(
            osp.join(coco_root, rel), osp.join(again, rel), shallow=False)
    assert not filecmp.cmp(
        osp.join(coco_root, 'train2017/000000000001.jpg'),
        osp.join(other, 'train2017/000000000001.jpg'),
        shallow=False)


def test_read_by_mmdet_coco_dataset(coco_root):
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    dataset = CocoDataset(
        data_root=coco_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True)
        ])
    assert len(dataset) == 4
    # mmdet's COCO metainfo applies: the 6 ids map to labels 0..5.
    assert dataset.cat_ids == list(range(1, 7))
    data = _load(coco_root, 'val')
    for i in range(len(dataset)):
        item = dataset[i]
        anns = [
            a for a in data['annotations'] if a['image_id'] == item['img_id']
        ]
        np.testing.assert_array_equal(item['gt_bboxes_labels'],
                                      [a['category_id'] - 1 for a in anns])
        masks = item['gt_masks'].to_ndarray().astype(bool)
        for mask, ann in zip(masks, anns):
            np.testing.assert_array_equal(mask, _raster(ann, SIZE, SIZE))


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_classes=3), 'num_classes must be in'),
    (dict(num_classes=11), 'num_classes must be in'),
    (dict(img_size=32), 'img_size must be >= 64'),
    (dict(num_val=0), 'num_train and num_val must be >= 1'),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_coco_like(str(tmp_path / 'x'), progress=False, **kwargs)


def test_refuses_non_empty_folder(coco_root):
    with pytest.raises(FileExistsError, match='not empty'):
        generate_coco_like(coco_root, progress=False)


def test_no_coco_libraries_needed(tmp_path):
    """boat_mm imports and writes COCO data without pycocotools, shapely
    or mmdet (blocked here; mmpretrain only tries mmdet). (With mmdet
    installed, mmpretrain's ``models.utils`` imports it whatever boat_mm
    does.)"""
    code = ('import sys\n'
            'for m in ("mmdet", "pycocotools", "shapely"):\n'
            '    sys.modules[m] = None\n'
            'from boat_mm.datasets import generate_coco_like\n'
            f'generate_coco_like({str(tmp_path / "d")!r}, num_train=1, '
            'num_val=1, img_size=64, progress=False)\n')
    subprocess.run([sys.executable, '-c', code], check=True)
    assert _load(str(tmp_path / 'd'), 'val')['images']


def test_command_line_coco_mode(tmp_path, monkeypatch, capsys):
    """gen_synthetic_data.py coco writes the same data as the function."""
    import runpy
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    out = str(tmp_path / 'cli')
    monkeypatch.setattr(sys, 'argv', [
        'gen_synthetic_data.py', 'coco', out, '--num-train', '2', '--num-val',
        '1', '--img-size', '64', '--seed', '5'
    ])
    runpy.run_path(
        osp.join(repo, 'tools', 'dataset_converters', 'gen_synthetic_data.py'),
        run_name='__main__')
    assert f'COCO-like data root: {out}' in capsys.readouterr().out
    ref = generate_coco_like(
        str(tmp_path / 'ref'),
        num_train=2,
        num_val=1,
        img_size=64,
        seed=5,
        progress=False)
    for rel in ('annotations/instances_train2017.json',
                'val2017/000000000001.jpg'):
        assert filecmp.cmp(
            osp.join(out, rel), osp.join(ref, rel), shallow=False)
