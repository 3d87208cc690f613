# Copyright (c) boat-mm contributors. All rights reserved.
"""mmdet's visualization hook with mmpretrain's sample interval.

``tools/test.py --interval N`` draws samples ``0, N, 2N, ...`` of the
test set, as mmpretrain's ``VisualizationHook`` does. mmdet's
``DetVisualizationHook`` uses its ``interval`` in validation only and
draws every test image. :class:`DetIntervalVisualizationHook` draws only
those samples when testing; ``tools/test.py`` uses it in place of the
config's ``DetVisualizationHook`` for ``--show`` / ``--show-dir``.
Importing this module registers it in mmdet's ``HOOKS``.
"""
from typing import Sequence

from mmdet.engine.hooks import DetVisualizationHook
from mmdet.registry import HOOKS
from mmdet.structures import DetDataSample
from mmengine.runner import Runner

__all__ = ['DetIntervalVisualizationHook']


# force: tools/test.py may be loaded more than once in a process (tests).
@HOOKS.register_module(force=True)
class DetIntervalVisualizationHook(DetVisualizationHook):
    """mmdet's ``DetVisualizationHook`` that, when testing, draws samples
    ``0, interval, 2 * interval, ...`` of the test set only (the parent
    draws every one). Validation is drawn as by the parent."""

    def before_test(self, runner: Runner) -> None:
        """Start counting the samples.

        Args:
            runner (Runner): The runner of the test.
        """
        self._test_index = 0

    def after_test_iter(self, runner: Runner, batch_idx: int, data_batch: dict,
                        outputs: Sequence[DetDataSample]) -> None:
        """Draw samples ``0, interval, ...`` of the test set, as the parent
        draws all.

        Args:
            runner (Runner): The runner of the test.
            batch_idx (int): Index of the batch.
            data_batch (dict): The batch.
            outputs (Sequence[DetDataSample]): Its predictions.
        """
        first = self._test_index
        chosen = [
            sample for index, sample in enumerate(outputs, first)
            if index % self.interval == 0
        ]
        # The parent draws what it is given and counts it; the count is of
        # all the samples tested.
        super().after_test_iter(runner, batch_idx, data_batch, chosen)
        self._test_index = first + len(outputs)
