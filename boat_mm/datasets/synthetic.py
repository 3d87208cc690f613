# Copyright (c) boat-mm contributors. All rights reserved.
"""Synthetic datasets laid out like ADE20K and ImageNet.

They let the demo, the tests and anyone without the real data run every
config end to end. The scenes are learnable, and some classes need context:

* Every *texture class* ``k`` has its own colour and its own oriented
  stripe pattern plus noise, so a local window identifies it.
* Two *look-alike classes* (``A`` and ``B``) are drawn with exactly the same
  colour and texture. An image contains ``A`` when a *marker* (a small disk
  of the marker class) is present somewhere far away in the image and ``B``
  otherwise. Only a model that relates distant tokens (as BOAT's
  feature-space attention does) can tell them apart reliably.

ADE20K layout (``generate_ade20k_like``)::

    OUT/ADEChallengeData2016/images/{training,validation}/ADE_*_%08d.jpg
    OUT/ADEChallengeData2016/annotations/{training,validation}/*.png

Annotations hold labels ``0..150`` (``0`` = "other", ignored by mmseg's
``ADE20KDataset`` with ``reduce_zero_label=True``); the classes used are the
first ``num_classes`` ADE20K ids (1 = wall, 2 = building, ...), so mmseg's
metainfo applies unchanged.

ImageNet layout (``generate_imagenet_like``)::

    OUT/{train,val}/<class_name>/<class_name>_%05d.JPEG
    OUT/meta/{train,val}.txt   ("<class_name>/<file> <label>" per line)

readable by mmpretrain's ``CustomDataset`` (folders) and ``ImageNet`` /
``CustomDataset`` with ``ann_file``. Its class of an image is the texture of
its central object; the look-alike pair differs only by a marker in a
corner.

Everything is deterministic from ``seed``.
"""
import os
import os.path as osp
from typing import Dict, List, Tuple

import cv2
import numpy as np
from tqdm import tqdm

__all__ = [
    'generate_ade20k_like', 'generate_imagenet_like', 'class_appearance',
    'render_texture'
]

# Number of texture classes that look different; the look-alike pair and
# the marker class come on top.
_MIN_CLASSES = 4


def _check_out_dir(out_dir: str) -> None:
    """Create ``out_dir``; refuse a non-empty one rather than mix data."""
    if osp.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(
            f'Output folder {out_dir!r} is not empty. Choose a new folder or '
            f'delete it first; the generator never overwrites data.')
    os.makedirs(out_dir, exist_ok=True)


def class_appearance(num_classes: int, seed: int) -> List[Dict]:
    """Colour and texture parameters of every class.

    Args:
        num_classes (int): Number of classes (>= 4). The last class is the
            marker; classes ``num_classes - 3`` and ``num_classes - 2`` are
            the look-alike pair (identical appearance).
        seed (int): Seed of the appearance table.

    Returns:
        list[dict]: One dict per class with ``color``, ``angle``, ``freq``,
        ``noise``.
    """
    if num_classes < _MIN_CLASSES:
        raise ValueError(f'num_classes must be >= {_MIN_CLASSES} (texture '
                         f'classes, a look-alike pair and a marker), got '
                         f'{num_classes}.')
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 180, num_classes, endpoint=False)
    rng.shuffle(hues)
    table = []
    for k in range(num_classes):
        hsv = np.uint8(
            [[[hues[k], rng.integers(90, 220),
               rng.integers(110, 230)]]])
        table.append(
            dict(
                color=cv2.cvtColor(hsv,
                                   cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32),
                angle=float(rng.uniform(0, np.pi)),
                freq=float(rng.uniform(0.25, 0.9)),
                noise=float(rng.uniform(6, 18))))
    a, b = num_classes - 3, num_classes - 2
    table[b] = dict(table[a])  # the look-alike pair shares its appearance
    # The marker is saturated and flat: easy to see, small in area.
    table[-1] = dict(
        color=np.float32([250, 250, 40]), angle=0., freq=0., noise=2.)
    return table


def render_texture(shape: Tuple[int, int], app: Dict,
                   rng: np.random.Generator) -> np.ndarray:
    """Render one class's texture.

    Args:
        shape (tuple[int, int]): ``(H, W)`` of the image.
        app (dict): The class's appearance: ``color``, ``angle``, ``freq``
            and ``noise``.
        rng (np.random.Generator): Source of the phase and the noise.

    Returns:
        np.ndarray: A float32 ``(H, W, 3)`` RGB image.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    proj = xx * np.cos(app['angle']) + yy * np.sin(app['angle'])
    stripes = np.sin(proj * app['freq'] + phase)[..., None] * 28.
    noise = rng.normal(0, app['noise'], size=(h, w, 3)).astype(np.float32)
    return app['color'][None, None] + stripes + noise


def _blob_mask(shape: Tuple[int, int], rng: np.random.Generator,
               center: Tuple[float, float], radius: float) -> np.ndarray:
    """A random smooth blob (union of a few ellipses) as a bool mask."""
    mask = np.zeros(shape, np.uint8)
    cy, cx = center
    for _ in range(int(rng.integers(2, 5))):
        oy, ox = rng.normal(0, radius * 0.35, size=2)
        axes = (max(2, int(radius * rng.uniform(0.45, 0.9))),
                max(2, int(radius * rng.uniform(0.45, 0.9))))
        cv2.ellipse(mask, (int(cx + ox), int(cy + oy)), axes,
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _ade_scene(size: int, num_classes: int, table: List[Dict],
               rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: image (H, W, 3) uint8 RGB and label map (0..num_classes)."""
    h = w = size
    look_a, look_b, marker = num_classes - 3, num_classes - 2, num_classes - 1
    textures = list(range(num_classes - 3))
    img = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)  # 0 = "other"
    # Background: a grid of cells, each a texture class, jittered borders.
    cells = int(rng.integers(2, 4))
    ys = np.sort(rng.integers(h // 5, h - h // 5, size=cells - 1))
    xs = np.sort(rng.integers(w // 5, w - w // 5, size=cells - 1))
    ys, xs = np.r_[0, ys, h], np.r_[0, xs, w]
    for i in range(cells):
        for j in range(cells):
            k = int(rng.choice(textures))
            sl = np.s_[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            img[sl] = render_texture((ys[i + 1] - ys[i], xs[j + 1] - xs[j]),
                                     table[k], rng)
            label[sl] = k + 1
    # The look-alike object, on one side of the image ...
    has_marker = bool(rng.random() < 0.5)
    side = int(rng.integers(0, 2))
    cx = w * (0.27 if side == 0 else 0.73)
    cy = h * rng.uniform(0.3, 0.7)
    obj = _blob_mask((h, w), rng, (cy, cx), size * 0.2)
    k = look_a if has_marker else look_b
    img[obj] = render_texture((h, w), table[k], rng)[obj]
    label[obj] = k + 1
    # ... and the marker (if any) far away on the other side.
    if has_marker:
        mx = w * (0.9 if side == 0 else 0.1)
        my = h * rng.uniform(0.15, 0.85)
        mark = np.zeros((h, w), np.uint8)
        cv2.circle(mark, (int(mx), int(my)), max(2, size // 18), 1, -1)
        mark = mark.astype(bool)
        img[mark] = render_texture((h, w), table[marker], rng)[mark]
        label[mark] = marker + 1
    # Thin unlabelled seams between cells ("other", label 0).
    for y in ys[1:-1]:
        label[max(0, y - 1):y + 1][~obj[max(0, y - 1):y + 1]] = 0
    return np.clip(img, 0, 255).astype(np.uint8), label


def generate_ade20k_like(out_dir: str,
                         num_train: int = 200,
                         num_val: int = 50,
                         img_size: int = 128,
                         num_classes: int = 8,
                         seed: int = 0,
                         progress: bool = True) -> str:
    """Write an ADE20K-layout segmentation dataset of synthetic scenes.

    Args:
        out_dir (str): Output folder; must be empty or missing.
        num_train (int): Training images. Defaults to 200.
        num_val (int): Validation images. Defaults to 50.
        img_size (int): Square image size in pixels. Defaults to 128.
        num_classes (int): Classes used (ADE ids ``1..num_classes``, at most
            150, at least 4). Defaults to 8.
        seed (int): Seed; the same seed writes the same bytes. Defaults to 0.
        progress (bool): Show a progress bar. Defaults to True.

    Returns:
        str: The data root, ``out_dir/ADEChallengeData2016``.
    """
    if not _MIN_CLASSES <= num_classes <= 150:
        raise ValueError(f'num_classes must be in [{_MIN_CLASSES}, 150], '
                         f'got {num_classes}.')
    if img_size < 32:
        raise ValueError(f'img_size must be >= 32, got {img_size}.')
    _check_out_dir(out_dir)
    root = osp.join(out_dir, 'ADEChallengeData2016')
    table = class_appearance(num_classes, seed)
    jobs = [('training', i) for i in range(num_train)]
    jobs += [('validation', i) for i in range(num_val)]
    for split in ('training', 'validation'):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
    for split, i in tqdm(jobs, desc='ADE20K-like', disable=not progress):
        split_seed = 0 if split == 'training' else 1
        rng = np.random.default_rng([seed, split_seed, i])
        img, label = _ade_scene(img_size, num_classes, table, rng)
        name = f'ADE_{"train" if split == "training" else "val"}_{i:08d}'
        cv2.imwrite(
            osp.join(root, 'images', split, name + '.jpg'),
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(osp.join(root, 'annotations', split, name + '.png'), label)
    return root


def _imagenet_image(size: int, label: int, num_classes: int, table: List[Dict],
                    rng: np.random.Generator) -> np.ndarray:
    """Draw one ``(size, size, 3)`` uint8 image of class ``label``."""
    h = w = size
    # Only look_a carries a marker; look_b is the same object without one.
    look_a = num_classes - 3
    # Neutral grey textured background, the class object in the centre.
    bg = dict(
        color=np.float32([120, 120, 120]),
        angle=float(rng.uniform(0, 3)),
        freq=0.3,
        noise=10.)
    img = render_texture((h, w), bg, rng)
    k = label
    obj = _blob_mask((h, w), rng,
                     (h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)),
                     size * 0.28)
    img[obj] = render_texture((h, w), table[k], rng)[obj]
    if label == look_a:
        corner = [(0.12, 0.12), (0.12, 0.88), (0.88, 0.12),
                  (0.88, 0.88)][int(rng.integers(0, 4))]
        mark = np.zeros((h, w), np.uint8)
        cv2.circle(mark, (int(w * corner[1]), int(h * corner[0])),
                   max(2, size // 14), 1, -1)
        mark = mark.astype(bool)
        img[mark] = render_texture((h, w), table[-1], rng)[mark]
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_imagenet_like(out_dir: str,
                           num_train: int = 20,
                           num_val: int = 5,
                           img_size: int = 64,
                           num_classes: int = 6,
                           seed: int = 0,
                           progress: bool = True) -> List[str]:
    """Write an ImageNet-layout classification dataset of synthetic images.

    Args:
        out_dir (str): Output folder; must be empty or missing.
        num_train (int): Training images per class. Defaults to 20.
        num_val (int): Validation images per class. Defaults to 5.
        img_size (int): Square image size. Defaults to 64.
        num_classes (int): Number of classes (>= 4). Class ``num_classes-1``
            is the marker's own class (a marker-coloured object); classes
            ``num_classes-3`` / ``num_classes-2`` differ only by a corner
            marker. Defaults to 6.
        seed (int): Seed; the same seed writes the same bytes.
        progress (bool): Show a progress bar. Defaults to True.

    Returns:
        list[str]: The class names, in label order.
    """
    if num_classes < _MIN_CLASSES:
        raise ValueError(f'num_classes must be >= {_MIN_CLASSES}, got '
                         f'{num_classes}.')
    if img_size < 16:
        raise ValueError(f'img_size must be >= 16, got {img_size}.')
    _check_out_dir(out_dir)
    table = class_appearance(num_classes, seed)
    classes = [f'class_{k:03d}' for k in range(num_classes)]
    jobs = [('train', k, i) for k in range(num_classes)
            for i in range(num_train)]
    jobs += [('val', k, i) for k in range(num_classes) for i in range(num_val)]
    lines: Dict[str, List[str]] = {'train': [], 'val': []}
    for name in classes:
        for split in ('train', 'val'):
            os.makedirs(osp.join(out_dir, split, name), exist_ok=True)
    os.makedirs(osp.join(out_dir, 'meta'), exist_ok=True)
    for split, k, i in tqdm(jobs, desc='ImageNet-like', disable=not progress):
        rng = np.random.default_rng([seed, 0 if split == 'train' else 1, k, i])
        img = _imagenet_image(img_size, k, num_classes, table, rng)
        fname = f'{classes[k]}_{i:05d}.JPEG'
        cv2.imwrite(
            osp.join(out_dir, split, classes[k], fname),
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines[split].append(f'{classes[k]}/{fname} {k}')
    for split, rows in lines.items():
        with open(osp.join(out_dir, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(rows) + '\n')
    return classes
