# Copyright (c) boat-mm contributors. All rights reserved.
"""mmpretrain's visualization hook, in RGB and for test-time augmentation.

mmpretrain's ``VisualizationHook`` hands ``data_batch['inputs']`` to
``UniversalVisualizer.visualize_cls``, which takes RGB images, but the
pipeline's ``LoadImageFromFile`` gives BGR ones (the data preprocessor's
``to_rgb`` converts them for the model): the drawn files have red and
blue swapped (open-mmlab/mmpretrain#1799). It also takes the batch as one
image per sample, where under a TTA model the batch holds one entry per
view (``inputs[v]`` the images of view ``v``, ``data_samples[v]`` their
samples), so the hook would index views as images and fail.
:class:`ClsTestVisualizationHook` draws the images in RGB when the model's
data preprocessor converts BGR to RGB, and draws one view per sample of a
TTA batch, the first one that is not flipped (the image the plain test
pipeline gives), with the merged prediction of the TTA model.
``tools/test.py`` uses it for ``--show`` / ``--show-dir``; importing this
module registers it in mmpretrain's ``HOOKS``.
"""
from typing import Sequence

import torch.nn as nn
from mmengine.runner import Runner
from mmpretrain.engine.hooks import VisualizationHook
from mmpretrain.registry import HOOKS
from mmpretrain.structures import DataSample

__all__ = ['ClsTestVisualizationHook']


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


def converts_bgr_to_rgb(model: nn.Module) -> bool:
    """Whether a classifier's data preprocessor turns the pipeline's BGR
    images into RGB ones (:func:`boat_mm.deploy.converts_to_rgb`).

    Args:
        model (nn.Module): The classifier, or a model wrapping it as
            ``module`` (DDP, a TTA model, whose own preprocessor may not
            convert).

    Returns:
        bool: Whether a data preprocessor of the model or of a model it
        wraps converts.
    """
    from boat_mm.deploy import converts_to_rgb
    while model is not None:
        preprocessor = getattr(model, 'data_preprocessor', None)
        if preprocessor is not None and converts_to_rgb(preprocessor):
            return True
        model = getattr(model, 'module', None)
    return False


# force: tools/test.py may be loaded more than once in a process (tests).
@HOOKS.register_module(force=True)
class ClsTestVisualizationHook(VisualizationHook):
    """mmpretrain's ``VisualizationHook`` that draws RGB images when the
    model converts BGR inputs to RGB, and the batches of a TTA model: per
    sample, its unflipped view (:func:`plain_view`) with the merged
    prediction. Otherwise drawn as by the parent."""

    def before_run(self, runner: Runner) -> None:
        """Note whether the images are BGR (:func:`converts_bgr_to_rgb`).

        Args:
            runner (Runner): The runner.
        """
        self._bgr_inputs = converts_bgr_to_rgb(runner.model)

    def _draw_samples(self,
                      batch_idx: int,
                      data_batch: dict,
                      data_samples: Sequence[DataSample],
                      step: int = 0) -> None:
        """Draw the plain view of a TTA batch, a plain batch as is, in RGB.

        Args:
            batch_idx (int): Index of the batch.
            data_batch (dict): The batch (one entry per view under TTA).
            data_samples (Sequence[DataSample]): Its predictions.
            step (int): Step recorded with the drawings.
        """
        if _is_tta_batch(data_batch):
            view = plain_view(data_batch)
            data_batch = dict(
                data_batch,
                inputs=data_batch['inputs'][view],
                data_samples=data_batch['data_samples'][view])
        if getattr(self, '_bgr_inputs', False):
            # CHW images (a list, or an NCHW batch): channels reversed.
            inputs = data_batch['inputs']
            inputs = (
                inputs.flip(1) if hasattr(inputs, 'flip') else
                [img.flip(0) for img in inputs])
            data_batch = dict(data_batch, inputs=inputs)
        super()._draw_samples(batch_idx, data_batch, data_samples, step)
