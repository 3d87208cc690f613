# Copyright (c) boat-mm contributors. All rights reserved.
"""tools/train.py (boat_tools.schedule): what it says of a schedule that
does not fit the run, and the learning-rate scaling of a run with gradient
accumulation."""
import itertools
import os.path as osp

import pytest
import torch
import torch.nn as nn
from boat_tools.schedule import (scale_lr_with_accumulation,
                                 schedule_length_note)
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset


def _cfg(loop: dict, *schedulers: dict) -> Config:
    return Config(dict(train_cfg=loop, param_scheduler=list(schedulers)))


ITERS = dict(type='IterBasedTrainLoop', max_iters=100)
EPOCHS = dict(type='EpochBasedTrainLoop', max_epochs=12)
WARMUP = dict(type='LinearLR', by_epoch=False, begin=0, end=10)


def test_schedule_shorter_than_the_loop():
    """PolyLR ending at 60 of 100 iterations: the last 40 train at its
    last value; the fix sets the end the loop has."""
    note = schedule_length_note(
        _cfg(ITERS, WARMUP,
             dict(type='PolyLR', by_epoch=False, begin=10, end=60)))
    assert note == (
        'param_scheduler[1] (PolyLR) ends at iteration 60, the training '
        'loop at train_cfg.max_iters=100: from iteration 60 on, the '
        "learning rate stays at the schedule's last value. Set its end to "
        '100 (`--cfg-options param_scheduler.1.end=100`), or leave end out '
        'and MMEngine ends it with the loop.')


def test_a_scheduler_alone_is_named_without_an_index():
    """``param_scheduler = dict(...)``: the fix's option has no index,
    which MMEngine would merge as a new key '0' of the dict."""
    cfg = Config(
        dict(
            train_cfg=ITERS,
            param_scheduler=dict(type='PolyLR', by_epoch=False, end=60)))
    note = schedule_length_note(cfg)
    assert note.startswith('param_scheduler (PolyLR) ends at iteration 60')
    assert '`--cfg-options param_scheduler.end=100`' in note
    cfg.merge_from_dict({'param_scheduler.end': 100})
    assert schedule_length_note(cfg) is None


def test_schedule_longer_than_the_loop():
    """A cosine phase to epoch 20 of a 12-epoch run stops half-way; the
    latest end of all counts (a warm-up in iterations is another unit)."""
    note = schedule_length_note(
        _cfg(EPOCHS, WARMUP, dict(type='CosineAnnealingLR', begin=0, end=20),
             dict(type='CosineAnnealingMomentum', begin=0, end=16)))
    assert note.startswith(
        'param_scheduler[1] (CosineAnnealingLR) ends at epoch 20, the '
        'training loop at train_cfg.max_epochs=12: the run stops before the '
        'schedule has run its course. Set its end to 12')


@pytest.mark.parametrize('schedulers', [
    [WARMUP, dict(type='PolyLR', by_epoch=False, begin=10, end=100)],
    [WARMUP, dict(type='PolyLR', by_epoch=False, begin=10)],
    [WARMUP],
    [dict(WARMUP, type='mmengine.ConstantLR')],
    [],
])
def test_schedules_that_fit_say_nothing(schedulers):
    """An end at the loop's length, or none (MMEngine gives it the
    loop's), says nothing; nor does a warm-up that ends early with nothing
    after it (the run goes on at the configured rate, as meant)."""
    assert schedule_length_note(_cfg(ITERS, *schedulers)) is None


def test_an_upstream_schedule_that_never_decays():
    """mmdet's Faster R-CNN 2x: MultiStepLR(end=12) with milestones 16
    and 23 in a 24-epoch loop never decays: the warning names it."""
    import mmdet
    cfg = Config.fromfile(
        osp.join(
            osp.dirname(mmdet.__file__), '.mim', 'configs', 'faster_rcnn',
            'faster-rcnn_r50-caffe_fpn_ms-2x_coco.py'))
    multistep = cfg.param_scheduler[1]
    assert min(multistep.milestones) > multistep.end  # the upstream slip
    assert schedule_length_note(cfg).startswith(
        'param_scheduler[1] (MultiStepLR) ends at epoch 12, the training '
        'loop at train_cfg.max_epochs=24: from epoch 12 on')


class _Points(Dataset):

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        x = torch.full((4, ), float(i))
        return dict(inputs=x, target=x.sum(0, keepdim=True))


class _Linear(BaseModel):

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, inputs, target=None, mode='tensor'):
        out = self.fc(inputs)
        return dict(loss=((out - target)**2).mean()) if mode == 'loss' \
            else out


_NAMES = itertools.count()


@pytest.mark.parametrize('steps', [1, 2, 4])
def test_auto_scale_lr_counts_accumulated_batches(tmp_path, steps):
    """--auto-scale-lr with accumulation: each optimizer step sees batch x
    accumulative_counts images, and the learning rate is scaled by that
    over base_batch_size (MMEngine alone counts the batch only)."""
    batch, base, lr = 2, 16, 0.1
    optim_wrapper = dict(
        optimizer=dict(type='SGD', lr=lr), accumulative_counts=steps)
    auto_scale_lr = dict(enable=True, base_batch_size=base)
    runner = Runner(
        model=_Linear(),
        work_dir=str(tmp_path),
        experiment_name=f'accumulation_{next(_NAMES)}',
        train_dataloader=dict(
            dataset=_Points(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=batch,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=1),
        optim_wrapper=optim_wrapper,
        auto_scale_lr=auto_scale_lr,
        default_hooks=dict(checkpoint=None))
    scale_lr_with_accumulation(runner,
                               Config(dict(optim_wrapper=optim_wrapper)))
    runner.train()
    group, = runner.optim_wrapper.param_groups
    assert group['lr'] == pytest.approx(lr * batch * steps / base)
