# Copyright (c) boat-mm contributors. All rights reserved.
"""mmseg's visualization hook with the ``test_out_dir`` of mmdet's.

The ``--show-dir`` of mmseg's and mmdet's ``tools/test.py`` is documented
as saved to ``WORK_DIR/TIMESTAMP/SHOW_DIR``. mmdet's
``DetVisualizationHook(test_out_dir=...)`` does that (a relative folder
goes under the run's log folder, one file per image, named as the image),
but mmseg's ``SegVisualizationHook`` has no such argument and its tool
sets the visualizer's ``save_dir`` instead, relative to the current
directory. :class:`SegShowDirVisualizationHook` gives mmseg configs
mmdet's behaviour, so that ``tools/test.py --show-dir`` means one thing
for every scope; importing this module registers it in mmseg's ``HOOKS``.
"""
import os.path as osp
from typing import Any, Optional, Sequence

import mmcv
from mmengine.fileio import get
from mmengine.runner import Runner
from mmengine.utils import mkdir_or_exist
from mmseg.engine.hooks import SegVisualizationHook
from mmseg.registry import HOOKS
from mmseg.structures import SegDataSample

__all__ = ['SegShowDirVisualizationHook']


# force: tools/test.py may be loaded more than once in a process (tests).
@HOOKS.register_module(force=True)
class SegShowDirVisualizationHook(SegVisualizationHook):
    """mmseg's ``SegVisualizationHook`` that writes the drawn test images
    to ``test_out_dir`` (relative: under ``WORK_DIR/TIMESTAMP``), one file
    per image named as the image, as mmdet's ``DetVisualizationHook``.

    Args:
        test_out_dir (str, optional): Where the drawn test images go; None
            draws as the parent (to the visualizer's backends).
        **kwargs: The arguments of ``SegVisualizationHook``.
    """

    def __init__(self,
                 test_out_dir: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_out_dir = test_out_dir

    def before_test(self, runner: Runner) -> None:
        """Put a relative ``test_out_dir`` under ``WORK_DIR/TIMESTAMP``.

        Args:
            runner (Runner): The runner of the test.
        """
        if self.test_out_dir is not None and self.draw:
            # An absolute folder stays as it is (osp.join keeps it).
            self.test_out_dir = osp.join(runner.work_dir, runner.timestamp,
                                         self.test_out_dir)
            mkdir_or_exist(self.test_out_dir)

    def after_test_iter(self, runner: Runner, batch_idx: int, data_batch: dict,
                        outputs: Sequence[SegDataSample]) -> None:
        """Draw the batch's images into ``test_out_dir``, or as the parent.

        Args:
            runner (Runner): The runner of the test.
            batch_idx (int): Index of the batch.
            data_batch (dict): The batch.
            outputs (Sequence[SegDataSample]): Its predictions.
        """
        if self.test_out_dir is None:
            super().after_test_iter(runner, batch_idx, data_batch, outputs)
            return
        if not self.draw or not self.every_n_inner_iters(
                batch_idx, self.interval):
            return
        for sample in outputs:
            name = osp.basename(sample.img_path)
            img = mmcv.imfrombytes(
                get(sample.img_path, backend_args=self.backend_args),
                channel_order='rgb')
            self._visualizer.add_datasample(
                f'test_{name}',
                img,
                data_sample=sample,
                show=self.show,
                wait_time=self.wait_time,
                out_file=osp.join(self.test_out_dir, name),
                step=runner.iter)
