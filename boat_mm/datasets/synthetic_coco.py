# Copyright (c) boat-mm contributors. All rights reserved.
"""A synthetic instance-segmentation dataset laid out like COCO 2017.

Scenes are textured object instances on a neutral textured background,
drawn with the class appearances of :mod:`boat_mm.datasets.synthetic`:

* every *texture class* has its own colour and oriented stripes, so the
  object's own pixels identify it;
* the *look-alike pair* (``A`` and ``B``) share one appearance; every
  look-alike instance of an image is ``A`` when the image holds a *marker*
  instance (a small flat disk, a class of its own) and ``B`` otherwise. The
  marker is placed apart from every other object, so telling ``A`` from
  ``B`` needs context from elsewhere in the image;
* instances have random star-shaped polygon outlines, may be cut by the
  image border and occlude the ones drawn before them (each keeps at least
  half of its area visible, as one piece without holes or as several).

Layout (read by mmdet's ``CocoDataset`` and ``CocoMetric`` unchanged)::

    OUT/annotations/instances_{train,val}2017.json
    OUT/{train,val}2017/%012d.jpg

Each annotation has the visible region as polygons (``segmentation``, one
per connected piece, COCO's ``[x1, y1, x2, y2, ...]``) that run along the
pixel edges, so that they rasterise (as mmdet decodes them) to exactly the
visible pixels, its ``bbox`` (``[x, y, w, h]`` of the visible pixels),
``area`` (visible pixels) and ``iscrowd=0``; COCO coordinates: pixel
``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``. Categories are the first
``num_classes`` COCO categories (ids ``1..num_classes``: person, bicycle,
car, ...), so mmdet's COCO metainfo applies; their names mean nothing
here: the last one is the marker and the two before it are the look-alike
pair.

Everything is deterministic from ``seed`` (the same seed writes the same
bytes).
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from .synthetic import _check_out_dir, class_appearance, render_texture

__all__ = ['generate_coco_like', 'COCO_CATEGORIES']

# The first ten categories of COCO 2017 (id, name, supercategory).
COCO_CATEGORIES = (
    (1, 'person', 'person'),
    (2, 'bicycle', 'vehicle'),
    (3, 'car', 'vehicle'),
    (4, 'motorcycle', 'vehicle'),
    (5, 'airplane', 'vehicle'),
    (6, 'bus', 'vehicle'),
    (7, 'train', 'vehicle'),
    (8, 'truck', 'vehicle'),
    (9, 'boat', 'vehicle'),
    (10, 'traffic light', 'outdoor'),
)

# An instance keeps at least this part of its own area visible.
_MIN_VISIBLE = 0.5
# Placement attempts per instance before it is left out.
_TRIES = 30


def _polygon(rng: np.random.Generator, center: Tuple[float, float],
             radius: float) -> np.ndarray:
    """Vertices ``(n, 2)`` (x, y) of a random star-shaped polygon."""
    n = int(rng.integers(5, 11))
    # Evenly spread, jittered angles: blobs rather than slivers.
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, size=n)) * (2 * np.pi / n)
    angles += rng.uniform(0, 2 * np.pi)
    radii = radius * rng.uniform(0.55, 1.0, size=n)
    cx, cy = center
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)],
                    axis=1)


def _fill(shape: Tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Boolean mask of the polygon ``points`` (``(n, 2)`` x, y)."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def _has_holes(mask: np.ndarray) -> bool:
    """Whether a contour of ``mask`` lies inside another (a hole)."""
    _, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _placement_ok(new: np.ndarray, full: List[np.ndarray],
                  visible: List[np.ndarray], min_area: int) -> bool:
    """Whether ``new`` may be drawn on top of the instances so far."""
    if new.sum() < min_area:
        return False
    for f, v in zip(full, visible):
        if not (v & new).any():
            continue
        rest = v & ~new
        if rest.sum() < _MIN_VISIBLE * f.sum() or _has_holes(rest):
            return False
    return True


def _coco_scene(
    size: int, num_classes: int, table: List[Dict], rng: np.random.Generator
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One scene: ``(H, W, 3)`` uint8 RGB and ``(class, visible mask)``
    per instance, in drawing order."""
    h = w = size
    look_a, look_b, marker = num_classes - 3, num_classes - 2, num_classes - 1
    # The texture classes and one slot for the look-alike object.
    kinds = list(range(num_classes - 3)) + [look_a]
    has_marker = bool(rng.random() < 0.5)
    bg = dict(
        color=np.full(3, rng.uniform(95, 150), np.float32),
        angle=float(rng.uniform(0, np.pi)),
        freq=float(rng.uniform(0.2, 0.5)),
        noise=8.)
    img = render_texture((h, w), bg, rng)

    classes: List[int] = []
    full: List[np.ndarray] = []
    visible: List[np.ndarray] = []
    min_area = max(16, size * size // 200)
    for _ in range(int(rng.integers(2, 6))):
        k = int(rng.choice(kinds))
        if k == look_a and not has_marker:
            k = look_b
        radius = size * rng.uniform(0.1, 0.2)
        for _ in range(_TRIES):
            # The centre may lie near the border: truncated objects.
            center = rng.uniform(0.6 * radius, size - 0.6 * radius, size=2)
            mask = _fill((h, w), _polygon(rng, center, radius))
            if _placement_ok(mask, full, visible, min_area):
                break
        else:
            continue
        visible = [v & ~mask for v in visible]
        classes.append(k)
        full.append(mask)
        visible.append(mask.copy())
    if has_marker:
        # A disk apart from every object (a margin of half its radius).
        radius = max(3., size / 16)
        occupied = np.zeros((h, w), np.uint8)
        if full:
            occupied = np.any(full, axis=0).astype(np.uint8)
        occupied = cv2.dilate(
            occupied,
            np.ones((3, 3), np.uint8),
            iterations=max(1, int(radius / 2)))
        for _ in range(_TRIES):
            cx, cy = rng.uniform(radius, size - radius, size=2)
            mask = np.zeros((h, w), np.uint8)
            cv2.circle(mask, (int(cx), int(cy)), int(radius), 1, -1)
            mask = mask.astype(bool)
            if not (mask & occupied.astype(bool)).any():
                break
        else:
            # No free spot: a scene without marker, and so without A.
            has_marker = False
            classes = [look_b if k == look_a else k for k in classes]
        if has_marker:
            classes.append(marker)
            full.append(mask)
            visible.append(mask.copy())
    for k, mask in zip(classes, full):
        img[mask] = render_texture((h, w), table[k], rng)[mask]
    return (np.clip(img, 0, 255).astype(np.uint8), list(zip(classes, visible)))


def _pixel_outlines(mask: np.ndarray) -> List[List[int]]:
    """Polygons along the pixel edges of each piece of a hole-free mask.

    In COCO coordinates (pixel ``(x, y)`` covers ``[x, x + 1) x [y, y +
    1)``), so a polygon encloses exactly its piece's pixels: it rasterises
    (pycocotools, as mmdet decodes) to the mask and its area is the pixel
    count. A piece touching another only at a corner shares that vertex.
    """
    # On a 2x grid, OpenCV's outline runs through the centres of the outer
    # sub-pixels, a quarter pixel inside the pixel edges; (u + 1) // 2 moves
    # each vertex to the pixel corner it stands for.
    up = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        pts = (contour.reshape(-1, 2) + 1) // 2
        # Drop repeated corners, then corners a straight edge runs through.
        pts = pts[(pts != np.roll(pts, 1, axis=0)).any(axis=1)]
        d_in = pts - np.roll(pts, 1, axis=0)
        d_out = np.roll(pts, -1, axis=0) - pts
        cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
        pts = pts[(cross != 0) | ((d_in * d_out).sum(axis=1) <= 0)]
        if len(pts) >= 3:
            polygons.append(pts.reshape(-1).tolist())
    return polygons


def _annotation(mask: np.ndarray) -> Optional[Dict]:
    """COCO polygons, bbox and area of a visible mask (None if empty)."""
    polygons = _pixel_outlines(mask)
    ys, xs = np.nonzero(mask)
    if not polygons or not len(xs):
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return dict(
        segmentation=polygons,
        bbox=[x0, y0, int(xs.max()) - x0 + 1,
              int(ys.max()) - y0 + 1],
        area=int(mask.sum()),
        iscrowd=0)


def generate_coco_like(out_dir: str,
                       num_train: int = 200,
                       num_val: int = 50,
                       img_size: int = 160,
                       num_classes: int = 6,
                       seed: int = 0,
                       progress: bool = True) -> str:
    """Write a COCO-layout instance dataset of synthetic scenes.

    Args:
        out_dir (str): Output folder; must be empty or missing.
        num_train (int): Training images. Defaults to 200.
        num_val (int): Validation images. Defaults to 50.
        img_size (int): Square image size in pixels (>= 64).
            Defaults to 160.
        num_classes (int): Categories (COCO ids ``1..num_classes``,
            4 to 10): ``num_classes - 3`` texture classes, the look-alike
            pair and the marker. Defaults to 6.
        seed (int): Seed; the same seed writes the same bytes. Defaults to 0.
        progress (bool): Show a progress bar. Defaults to True.

    Returns:
        str: The data root, ``out_dir`` (holding ``annotations/``,
        ``train2017/`` and ``val2017/``).
    """
    if not 4 <= num_classes <= len(COCO_CATEGORIES):
        raise ValueError(
            f'num_classes must be in [4, {len(COCO_CATEGORIES)}] (texture '
            f'classes, a look-alike pair and a marker), got {num_classes}.')
    if img_size < 64:
        raise ValueError(f'img_size must be >= 64, got {img_size}.')
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got '
                         f'{num_train} and {num_val}.')
    _check_out_dir(out_dir)
    table = class_appearance(num_classes, seed)
    categories = [
        dict(id=cid, name=name, supercategory=sup)
        for cid, name, sup in COCO_CATEGORIES[:num_classes]
    ]
    os.makedirs(osp.join(out_dir, 'annotations'))
    for split, count, split_seed in (('train', num_train, 0), ('val', num_val,
                                                               1)):
        folder = f'{split}2017'
        os.makedirs(osp.join(out_dir, folder))
        images, annotations = [], []
        for i in tqdm(
                range(count), desc=f'COCO-like {split}', disable=not progress):
            rng = np.random.default_rng([seed, split_seed, i])
            img, instances = _coco_scene(img_size, num_classes, table, rng)
            image_id = i + 1
            file_name = f'{image_id:012d}.jpg'
            cv2.imwrite(
                osp.join(out_dir, folder, file_name),
                cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(
                dict(
                    id=image_id,
                    file_name=file_name,
                    width=img_size,
                    height=img_size))
            for k, mask in instances:
                ann = _annotation(mask)
                if ann is None:
                    continue
                ann.update(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=categories[k]['id'])
                annotations.append(ann)
        with open(
                osp.join(out_dir, 'annotations',
                         f'instances_{split}2017.json'), 'w') as f:
            json.dump(
                dict(
                    info=dict(
                        description='boat-mm synthetic COCO-like data',
                        seed=seed),
                    images=images,
                    annotations=annotations,
                    categories=categories), f)
    return out_dir
