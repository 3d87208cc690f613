# Copyright (c) boat-mm contributors. All rights reserved.
import filecmp
import glob
import os.path as osp

import cv2
import numpy as np
import pytest
from mmengine.registry import init_default_scope

from boat_mm.datasets import (class_appearance, generate_ade20k_like,
                              generate_imagenet_like)


def _tree(root: str) -> list:
    return sorted(
        osp.relpath(p, root)
        for p in glob.glob(osp.join(root, '**', '*'), recursive=True)
        if osp.isfile(p))


def test_ade20k_layout_and_labels(ade_root):
    for split in ('training', 'validation'):
        imgs = sorted(glob.glob(osp.join(ade_root, 'images', split, '*.jpg')))
        anns = sorted(
            glob.glob(osp.join(ade_root, 'annotations', split, '*.png')))
        assert len(imgs) == (8 if split == 'training' else 4)
        assert [osp.basename(p)[:-4] for p in imgs] == \
            [osp.basename(p)[:-4] for p in anns]
    labels = np.concatenate([
        cv2.imread(p, cv2.IMREAD_UNCHANGED).ravel()
        for p in glob.glob(osp.join(ade_root, 'annotations', '*', '*.png'))
    ])
    assert labels.dtype == np.uint8
    assert labels.min() == 0  # "other" is used
    assert labels.max() <= 150 and labels.max() >= 2


def test_ade20k_determinism(tmp_path):
    kw = dict(num_train=3, num_val=1, img_size=48, progress=False)
    a = generate_ade20k_like(str(tmp_path / 'a'), seed=3, **kw)
    b = generate_ade20k_like(str(tmp_path / 'b'), seed=3, **kw)
    c = generate_ade20k_like(str(tmp_path / 'c'), seed=4, **kw)
    assert _tree(a) == _tree(b) == _tree(c)
    same = [
        filecmp.cmp(osp.join(a, f), osp.join(b, f), shallow=False)
        for f in _tree(a)
    ]
    assert all(same)
    diff = [
        filecmp.cmp(osp.join(a, f), osp.join(c, f), shallow=False)
        for f in _tree(a)
    ]
    assert not all(diff)


def test_non_empty_output_folder_is_refused(tmp_path):
    (tmp_path / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match='not empty'):
        generate_ade20k_like(
            str(tmp_path), num_train=1, num_val=1, progress=False)
    with pytest.raises(FileExistsError, match='not empty'):
        generate_imagenet_like(str(tmp_path), progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='num_classes'):
        class_appearance(3, 0)
    out = str(tmp_path / 'out')
    for kwargs, match in [(dict(num_classes=3), r'in \[4, 150\], got 3'),
                          (dict(num_classes=151), r'in \[4, 150\], got 151')]:
        with pytest.raises(ValueError, match=match):
            generate_ade20k_like(out, progress=False, **kwargs)
    for kwargs, match in [(dict(num_classes=3), 'num_classes must be >= 4'),
                          (dict(img_size=15), 'img_size must be >= 16')]:
        with pytest.raises(ValueError, match=match):
            generate_imagenet_like(out, progress=False, **kwargs)
    assert not osp.exists(out)  # refused before writing anything


def test_look_alike_classes_need_context(tmp_path):
    """The look-alike pair has identical local statistics; the marker is
    what tells them apart, and it is far from the object."""
    num_classes = 8
    table = class_appearance(num_classes, seed=0)
    a, b = table[num_classes - 3], table[num_classes - 2]
    assert np.array_equal(a['color'], b['color'])
    assert a['angle'] == b['angle'] and a['freq'] == b['freq']
    root = generate_ade20k_like(
        str(tmp_path),
        num_train=16,
        num_val=0,
        img_size=96,
        num_classes=num_classes,
        progress=False)
    look_a, look_b, marker = num_classes - 2, num_classes - 1, num_classes
    seen = set()
    for ann in glob.glob(osp.join(root, 'annotations', 'training', '*')):
        label = cv2.imread(ann, cv2.IMREAD_UNCHANGED)
        present = set(np.unique(label).tolist())
        assert (look_a in present) != (look_b in present)
        # Marker present exactly when the object is of class A ...
        assert (marker in present) == (look_a in present)
        if marker in present:
            # ... and far away from it (more than a third of the width).
            obj_x = np.nonzero(label == look_a)[1].mean()
            mark_x = np.nonzero(label == marker)[1].mean()
            assert abs(obj_x - mark_x) > 96 / 3
        seen |= present
    assert {look_a, look_b, marker} <= seen


def test_ade20k_readable_by_mmseg(ade_root):
    from mmseg.registry import DATASETS
    init_default_scope('mmseg')
    ds = DATASETS.build(
        dict(
            type='ADE20KDataset',
            data_root=ade_root,
            data_prefix=dict(
                img_path='images/validation',
                seg_map_path='annotations/validation'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', reduce_zero_label=True),
                dict(type='PackSegInputs')
            ]))
    assert len(ds) == 4
    sample = ds[0]
    gt = sample['data_samples'].gt_sem_seg.data
    assert tuple(sample['inputs'].shape) == (3, 64, 64)
    values = set(gt.unique().tolist())
    assert 255 in values  # "other" became ignore
    assert max(values - {255}) < 150


def test_imagenet_like_layout_and_mmpretrain(imagenet_root):
    from mmpretrain.registry import DATASETS
    init_default_scope('mmpretrain')
    classes = sorted(
        osp.basename(p)
        for p in glob.glob(osp.join(imagenet_root, 'train', '*')))
    assert len(classes) == 6
    folder = DATASETS.build(
        dict(
            type='CustomDataset',
            data_root=imagenet_root,
            data_prefix='train',
            pipeline=[]))
    assert len(folder) == 6 * 3
    assert folder.CLASSES == tuple(classes)
    ann = DATASETS.build(
        dict(
            type='ImageNet',
            data_root=imagenet_root,
            split='',
            ann_file='meta/val.txt',
            data_prefix='val',
            pipeline=[]))
    assert len(ann) == 6 * 2
    labels = sorted({ann.get_data_info(i)['gt_label'] for i in range(12)})
    assert labels == list(range(6))
    img = cv2.imread(ann.get_data_info(0)['img_path'])
    assert img.shape == (32, 32, 3)
