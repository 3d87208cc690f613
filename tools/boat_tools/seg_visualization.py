# Copyright (c) boat-mm contributors. All rights reserved.
"""mmseg's visualization hook with the ``test_out_dir`` of mmdet's and
mmpretrain's sample interval.

The ``--show-dir`` of mmseg's and mmdet's ``tools/test.py`` is documented
as saved to ``WORK_DIR/TIMESTAMP/SHOW_DIR``. mmdet's
``DetVisualizationHook(test_out_dir=...)`` does that (a relative folder
goes under the run's log folder, one file per image, named as the image),
but mmseg's ``SegVisualizationHook`` has no such argument and its tool
sets the visualizer's ``save_dir`` instead, relative to the current
directory. mmseg's hook also counts its ``interval`` in batches (all the
samples of every n-th batch), where ``tools/test.py --interval N`` means
samples ``0, N, 2N, ...`` of the test set, as mmpretrain's hook draws
them. :class:`SegShowDirVisualizationHook` gives mmseg configs both, so
that ``--show``, ``--show-dir`` and ``--interval`` mean one thing for
every scope; importing this module registers it in mmseg's ``HOOKS``.
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
    """mmseg's ``SegVisualizationHook`` that, when testing, draws samples
    ``0, interval, 2 * interval, ...`` of the test set (mmpretrain's
    count, not every ``interval``-th batch) and writes them to
    ``test_out_dir`` (relative: under ``WORK_DIR/TIMESTAMP``), one file per
    image named as the image, as mmdet's ``DetVisualizationHook``.

    Args:
        test_out_dir (str, optional): Where the drawn test images go; None
            draws to the visualizer's window and backends, as the parent.
        **kwargs: The arguments of ``SegVisualizationHook``.
    """

    def __init__(self,
                 test_out_dir: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_out_dir = test_out_dir
        self._test_index = 0

    def before_test(self, runner: Runner) -> None:
        """Start counting the samples; put a relative ``test_out_dir``
        under ``WORK_DIR/TIMESTAMP``.

        Args:
            runner (Runner): The runner of the test.
        """
        self._test_index = 0
        if self.test_out_dir is not None and self.draw:
            # An absolute folder stays as it is (osp.join keeps it).
            self.test_out_dir = osp.join(runner.work_dir, runner.timestamp,
                                         self.test_out_dir)
            mkdir_or_exist(self.test_out_dir)

    def after_test_iter(self, runner: Runner, batch_idx: int, data_batch: dict,
                        outputs: Sequence[SegDataSample]) -> None:
        """Draw samples ``0, interval, ...`` of the test set, into
        ``test_out_dir`` if given.

        Args:
            runner (Runner): The runner of the test.
            batch_idx (int): Index of the batch.
            data_batch (dict): The batch.
            outputs (Sequence[SegDataSample]): Its predictions.
        """
        if not self.draw:
            return
        first = self._test_index
        self._test_index += len(outputs)
        for index, sample in enumerate(outputs, first):
            if index % self.interval:
                continue
            name = osp.basename(sample.img_path)
            img = mmcv.imfrombytes(
                get(sample.img_path, backend_args=self.backend_args),
                channel_order='rgb')
            out_file = None
            if self.test_out_dir is not None:
                out_file = osp.join(self.test_out_dir, name)
            self._visualizer.add_datasample(
                f'test_{name}',
                img,
                data_sample=sample,
                show=self.show,
                wait_time=self.wait_time,
                out_file=out_file,
                step=index)
