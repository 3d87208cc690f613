# Copyright (c) boat-mm contributors. All rights reserved.
"""mmpretrain's visualization hook for test-time augmentation.

mmpretrain's ``VisualizationHook`` takes ``data_batch['inputs']`` as one
image per sample. Under a TTA model the batch holds one entry per view
(``inputs[v]`` the images of view ``v``, ``data_samples[v]`` their
samples), so the hook would index views as images and fail.
:class:`ClsTTAVisualizationHook` draws one view per sample, the first one
that is not flipped (the image the plain test pipeline gives), with the
merged prediction of the TTA model. ``tools/test.py`` uses it for
``--tta`` with ``--show`` / ``--show-dir``; importing this module
registers it in mmpretrain's ``HOOKS``.
"""
from typing import Sequence

from mmpretrain.engine.hooks import VisualizationHook
from mmpretrain.registry import HOOKS
from mmpretrain.structures import DataSample

__all__ = ['ClsTTAVisualizationHook']


def _is_tta_batch(data_batch: dict) -> bool:
    """Whether the batch holds a list of samples per view (TTA)."""
    samples = data_batch.get('data_samples')
    return bool(samples) and isinstance(samples[0], (list, tuple))


def plain_view(data_batch: dict) -> int:
    """The view of a TTA batch to draw.

    Args:
        data_batch (dict): A TTA batch: ``data_samples[v]`` the samples of
            view ``v``.

    Returns:
        int: Index of the first view whose samples are all unflipped (0 if
        every view is flipped).
    """
    for i, samples in enumerate(data_batch['data_samples']):
        if not any(s.metainfo.get('flip', False) for s in samples):
            return i
    return 0


# force: tools/test.py may be loaded more than once in a process (tests).
@HOOKS.register_module(force=True)
class ClsTTAVisualizationHook(VisualizationHook):
    """mmpretrain's ``VisualizationHook`` that also draws the batches of a
    TTA model: per sample, its unflipped view (:func:`plain_view`) with the
    merged prediction. Plain batches are drawn as by the parent."""

    def _draw_samples(self,
                      batch_idx: int,
                      data_batch: dict,
                      data_samples: Sequence[DataSample],
                      step: int = 0) -> None:
        """Draw the plain view of a TTA batch, a plain batch as is."""
        if _is_tta_batch(data_batch):
            view = plain_view(data_batch)
            data_batch = dict(
                data_batch,
                inputs=data_batch['inputs'][view],
                data_samples=data_batch['data_samples'][view])
        super()._draw_samples(batch_idx, data_batch, data_samples, step)
