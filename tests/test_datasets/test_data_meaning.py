# Copyright (c) boat-mm contributors. All rights reserved.
"""What the generated data means, read back from the written pixels.

Every class has its own colour (boat_mm/datasets/synthetic.py); the
stripes are added equally to the three channels and so vanish in the
*chroma* (a pixel minus its channel mean), where each pixel is assigned
the class (or the grey background, chroma 0) of the nearest colour. The
look-alike pair shares one colour and is told apart only by the marker
(its own saturated colour). From that, independently of the generator's
code paths:

* ImageNet-like: the object of every image has the colour of its class
  folder, whose label in ``meta/*.txt`` is the folder's index; the marker
  is drawn, away from the object, exactly in the images of the marked
  class of the pair (and is the object of the marker class).
* ADE20K-like: every labelled region has the colour of its label; a scene
  labels the marked class of the pair exactly when a marker is labelled
  and drawn, the unmarked class otherwise.
"""
import glob
import os.path as osp
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pytest

from boat_mm.datasets import generate_ade20k_like, generate_imagenet_like
from boat_mm.datasets.synthetic import class_appearance

BACKGROUND = -1


def read_rgb(path: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB).astype(np.float32)


def pixel_classes(img: np.ndarray, num_classes: int, seed: int,
                  with_background: bool) -> np.ndarray:
    """Nearest class colour in chroma, per pixel; the look-alike pair is
    reported as its first class (``num_classes - 3``)."""
    colors = np.stack(
        [t['color'] for t in class_appearance(num_classes, seed)])
    # The pair shares its colour: the generator's own table must say so.
    assert np.array_equal(colors[-3], colors[-2])
    cands = colors - colors.mean(-1, keepdims=True)
    labels = np.arange(num_classes)
    if with_background:
        cands = np.concatenate([np.zeros((1, 3), np.float32), cands])
        labels = np.concatenate([[BACKGROUND], labels])
    chroma = img - img.mean(-1, keepdims=True)
    dist = ((chroma[..., None, :] - cands)**2).sum(-1)
    return labels[dist.argmin(-1)]


def merge_pair(k: int, num_classes: int) -> int:
    return num_classes - 3 if k == num_classes - 2 else k


# ---------------------------------------------------------------------------
# ImageNet-like.
# ---------------------------------------------------------------------------

IMAGENET_CASES = [(6, 0), (7, 3)]  # (num_classes, seed)


@pytest.fixture(scope='module', params=IMAGENET_CASES)
def imagenet(request, tmp_path_factory):
    num_classes, seed = request.param
    out = str(tmp_path_factory.mktemp('imagenet_meaning'))
    classes = generate_imagenet_like(
        out,
        num_train=3,
        num_val=2,
        img_size=48,
        num_classes=num_classes,
        seed=seed,
        progress=False)
    return out, classes, num_classes, seed


def _meta(out: str, split: str) -> List[Tuple[str, int]]:
    with open(osp.join(out, 'meta', f'{split}.txt')) as f:
        rows = [line.split() for line in f.read().splitlines() if line]
    return [(path, int(label)) for path, label in rows]


def test_imagenet_labels_are_the_folder_index(imagenet):
    out, classes, num_classes, _ = imagenet
    assert classes == sorted(classes) and len(classes) == num_classes
    for split, per_class in (('train', 3), ('val', 2)):
        rows = _meta(out, split)
        files = sorted(
            osp.relpath(p, osp.join(out, split))
            for p in glob.glob(osp.join(out, split, '*', '*.JPEG')))
        assert sorted(path for path, _ in rows) == files
        assert len(files) == num_classes * per_class
        for path, label in rows:
            folder = path.split('/')[0]
            # mmpretrain's folder datasets label sorted folders 0, 1, ...
            assert label == classes.index(folder), path


def test_imagenet_images_show_their_class_and_marker(imagenet):
    out, classes, num_classes, seed = imagenet
    look_a, marker = num_classes - 3, num_classes - 1
    for split in ('train', 'val'):
        for path, label in _meta(out, split):
            img = read_rgb(osp.join(out, split, path))
            size = img.shape[0]
            pix = pixel_classes(img, num_classes, seed, True)
            counts = np.bincount(
                pix[pix != BACKGROUND].ravel(), minlength=num_classes)
            # The object: most non-background pixels.
            assert counts.argmax() == merge_pair(label, num_classes), path
            marked = pix == marker
            if label == look_a:
                ys, xs = np.nonzero(marked)
                assert len(ys) >= 4, path
                # In a corner, away from the central object.
                dist = np.hypot(ys - size / 2, xs - size / 2)
                assert (dist > 0.45 * size).mean() > 0.9, path
            elif label != marker:
                assert marked.sum() <= 1, path  # JPEG noise at most


# ---------------------------------------------------------------------------
# ADE20K-like.
# ---------------------------------------------------------------------------

ADE_CASES = [(8, 0), (6, 2)]


@pytest.fixture(scope='module', params=ADE_CASES)
def ade(request, tmp_path_factory):
    num_classes, seed = request.param
    out = str(tmp_path_factory.mktemp('ade_meaning'))
    root = generate_ade20k_like(
        out,
        num_train=6,
        num_val=3,
        img_size=64,
        num_classes=num_classes,
        seed=seed,
        progress=False)
    pairs = []
    for img in sorted(glob.glob(osp.join(root, 'images', '*', '*.jpg'))):
        ann = img.replace(osp.join('images', ''),
                          osp.join('annotations', '')).replace('.jpg', '.png')
        pairs.append((img, ann))
    assert len(pairs) == 9
    return pairs, num_classes, seed


def test_ade_regions_have_the_colour_of_their_label(ade):
    pairs, num_classes, seed = ade
    for img_path, ann_path in pairs:
        label = cv2.imread(ann_path, cv2.IMREAD_UNCHANGED)
        assert label.max() <= num_classes, ann_path
        pix = pixel_classes(read_rgb(img_path), num_classes, seed, False)
        checked = 0
        for v in np.unique(label):
            if v == 0:
                continue  # "other": the seams between cells
            # Inner pixels only: JPEG blurs colour across region borders.
            inner = cv2.erode((label == v).astype(np.uint8),
                              np.ones((3, 3), np.uint8)).astype(bool)
            if inner.sum() < 4:
                continue
            k = merge_pair(int(v) - 1, num_classes)  # ADE ids start at 1
            agree = (pix[inner] == k).mean()
            assert agree > 0.9, (img_path, int(v), agree)
            checked += inner.sum()
        assert checked > 0.5 * label.size, img_path


def test_ade_marker_decides_the_look_alike_class(ade):
    pairs, num_classes, seed = ade
    look_a, look_b, marker = (num_classes - 3 + 1, num_classes - 2 + 1,
                              num_classes)  # ADE ids
    seen: Dict[bool, int] = {True: 0, False: 0}
    for img_path, ann_path in pairs:
        label = cv2.imread(ann_path, cv2.IMREAD_UNCHANGED)
        pix = pixel_classes(read_rgb(img_path), num_classes, seed, False)
        has_a, has_b = (label == look_a).any(), (label == look_b).any()
        assert has_a != has_b, img_path  # one look-alike object per scene
        labelled = (label == marker).sum()
        drawn = (pix == marker - 1).sum()
        if has_a:
            assert labelled >= 4 and drawn >= 4, img_path
            # The drawn marker lies in its labelled disk (JPEG: +1 pixel).
            disk = cv2.dilate((label == marker).astype(np.uint8),
                              np.ones((3, 3), np.uint8)).astype(bool)
            assert (disk[pix == marker - 1]).mean() > 0.9, img_path
        else:
            assert labelled == 0 and drawn <= 1, img_path
        seen[bool(has_a)] += 1
    assert seen[True] and seen[False]  # both cases occur
