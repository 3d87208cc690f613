# Copyright (c) boat-mm contributors. All rights reserved.
"""Look at the clusters that BOAT's feature-space local attention forms.

FSLA groups the tokens of a whole stage map into balanced clusters of
similar features (per head) and attends inside each cluster. These helpers
capture that grouping during a normal forward pass of a BOAT backbone and
paint it over the image:

* :func:`find_fsla_modules` / :func:`get_boat_backbone`: where FSLA is
  (from :mod:`boat_mm.analysis.capture`, re-exported);
* :func:`capture_cluster_ids`: ``(B, heads, H_stage, W_stage)`` cluster ids
  of chosen FSLA modules for an input batch;
* :func:`colorize_ids`, :func:`upsample_ids`, :func:`draw_clusters`: an id
  map as colours, at image resolution, next to the image.

``tools/visualization/vis_clusters.py`` is the command-line front end.
"""
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from boat_mm.analysis.capture import (Location, find_fsla_modules,
                                      fsla_input_hooks, get_boat_backbone)
from boat_mm.models.utils import FeatureSpaceLocalAttention

__all__ = [
    'find_fsla_modules', 'get_boat_backbone', 'capture_cluster_ids',
    'cluster_palette', 'colorize_ids', 'upsample_ids', 'draw_clusters'
]


def capture_cluster_ids(
        model: nn.Module,
        inputs: Tensor,
        locations: Optional[Sequence[Location]] = None
) -> Dict[Location, Tensor]:
    """Cluster ids formed by FSLA modules during a forward of ``inputs``.

    On the input of each chosen FSLA module
    (:func:`boat_mm.analysis.fsla_input_hooks`), its
    :meth:`~FeatureSpaceLocalAttention.cluster_ids`: exactly the grouping
    its attention uses, unless a cluster hook
    (:meth:`~FeatureSpaceLocalAttention.register_cluster_hook`) replaces
    it in the forward. The backbone runs once in eval mode without
    gradients (its mode is restored afterwards).

    Args:
        model (nn.Module): A BOAT backbone or a model holding one as
            ``backbone``.
        inputs (Tensor): ``(B, 3, H, W)`` normalised images.
        locations (Sequence[tuple[int, int]], optional): ``(stage, block)``
            pairs to capture; None for every FSLA module.

    Returns:
        dict[tuple[int, int], Tensor]: Per location, ``(B, heads, H_s,
        W_s)`` int64 cluster ids in ``[0, G)`` on the stage map.

    Raises:
        TypeError: The model has no BOAT backbone.
        ValueError: A location has no FSLA module (the message lists the
            ones that have) or the backbone has none at all.
    """
    backbone = get_boat_backbone(model)
    captured: Dict[Location, Tensor] = {}

    def record(loc: Location, module: FeatureSpaceLocalAttention, x: Tensor,
               hw: Location) -> None:
        ids = module.cluster_ids(x, hw)
        captured[loc] = ids.view(*ids.shape[:2], *hw).cpu()

    was_training = backbone.training
    with fsla_input_hooks(backbone, record, locations) as wanted:
        try:
            backbone.eval()
            with torch.no_grad():
                backbone(inputs)
        finally:
            backbone.train(was_training)
    return {loc: captured[loc] for loc in wanted}


def _van_der_corput(k: np.ndarray, bits: int) -> np.ndarray:
    """Bit-reversed ``k`` over ``bits`` bits, in ``[0, 1)``."""
    out = np.zeros(k.shape, np.float64)
    for b in range(bits):
        out += ((k >> b) & 1) / 2.0**(b + 1)
    return out


def cluster_palette(num_colors: int) -> np.ndarray:
    """Distinct, well separated BGR colours for cluster ids.

    Hues follow the bit-reversed id, so ids differing in the last bit
    (sibling clusters, ``2j`` and ``2j + 1``) get opposite hues. The first
    128 colours are fully bright, the next 128 darker, and so on; up to 384
    colours are pairwise distinct.

    Args:
        num_colors (int): Number of colours, ``>= 1``.

    Returns:
        np.ndarray: ``(num_colors, 3)`` uint8, BGR (OpenCV order).
    """
    if num_colors < 1:
        raise ValueError(f'num_colors must be >= 1, got {num_colors}.')
    import cv2
    k = np.arange(num_colors)
    hue = np.floor(_van_der_corput(k % 128, 7) * 180)
    sat = np.full(num_colors, 220.)
    val = np.array([255., 175., 110.])[(k // 128) % 3]
    hsv = np.stack([hue, sat, val], axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]


def _to_numpy(ids: Union[np.ndarray, Tensor]) -> np.ndarray:
    """``ids`` as an int64 ``(H, W)`` array, checked."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f'Expected an (H, W) id map, got shape {ids.shape}; '
                         f'pick one sample and head, e.g. ids[0, head].')
    if ids.size and ids.min() < 0:
        raise ValueError(f'Cluster ids must be >= 0, got {ids.min()}.')
    return ids.astype(np.int64)


def colorize_ids(ids: Union[np.ndarray, Tensor],
                 num_ids: Optional[int] = None) -> np.ndarray:
    """Paint an id map, one :func:`cluster_palette` colour per id.

    Args:
        ids (np.ndarray | Tensor): ``(H, W)`` non-negative integer ids.
        num_ids (int, optional): Size of the palette (so that several maps
            share colours); None for ``ids.max() + 1``.

    Returns:
        np.ndarray: ``(H, W, 3)`` uint8 BGR image.
    """
    ids = _to_numpy(ids)
    top = int(ids.max()) + 1 if ids.size else 1
    num_ids = top if num_ids is None else num_ids
    if top > num_ids:
        raise ValueError(f'num_ids={num_ids} but the map holds id {top - 1}.')
    return cluster_palette(num_ids)[ids]


def upsample_ids(ids: Union[np.ndarray, Tensor],
                 out_hw: Tuple[int, int],
                 stride: Optional[int] = None) -> np.ndarray:
    """Nearest-neighbour id map at image resolution.

    Args:
        ids (np.ndarray | Tensor): ``(h, w)`` ids of a stage map.
        out_hw (tuple[int, int]): Image ``(H, W)``.
        stride (int, optional): Pixels per token of the stage. When given
            (and ``h * stride >= H``, ``w * stride >= W``), token ``(r, c)``
            covers pixels ``[r * stride, (r + 1) * stride)``, cropped at the
            bottom/right, which is how BOAT pads inputs that are not a
            multiple of the stride. None (or a stride that does not cover
            the image) stretches the map over the image.

    Returns:
        np.ndarray: ``(H, W)`` int64 ids.
    """
    ids = _to_numpy(ids)
    (h, w), (H, W) = ids.shape, out_hw
    if stride and h * stride >= H and w * stride >= W:
        rows, cols = np.arange(H) // stride, np.arange(W) // stride
    else:
        rows, cols = np.arange(H) * h // H, np.arange(W) * w // W
    return ids[rows[:, None], cols[None, :]]


def draw_clusters(image: np.ndarray,
                  ids: Union[np.ndarray, Tensor],
                  alpha: float = 0.5,
                  stride: Optional[int] = None,
                  num_ids: Optional[int] = None) -> np.ndarray:
    """The image and the image overlaid with cluster colours, side by side.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 image (BGR to match the
            palette's order when written with OpenCV).
        ids (np.ndarray | Tensor): ``(h, w)`` cluster ids of a stage map.
        alpha (float): Weight of the colours in the overlay. Defaults to 0.5.
        stride (int, optional): Pixels per token, see :func:`upsample_ids`.
        num_ids (int, optional): Palette size, see :func:`colorize_ids`.

    Returns:
        np.ndarray: ``(H, 2 * W, 3)`` uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'Expected an (H, W, 3) image, got {image.shape}.')
    if not 0. <= alpha <= 1.:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}.')
    image = image.astype(np.uint8)
    colours = colorize_ids(
        upsample_ids(ids, image.shape[:2], stride), num_ids=num_ids)
    overlay = image * (1. - alpha) + colours * alpha
    overlay = np.clip(np.rint(overlay), 0, 255).astype(np.uint8)
    return np.concatenate([image, overlay], axis=1)
