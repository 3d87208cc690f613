# Copyright (c) boat-mm contributors. All rights reserved.
"""MMEngine checkpoints written with boat_mm imported load weights-only.

``torch.load`` is called with its default (``weights_only=True`` since
torch 2.6) everywhere, as MMEngine does.
"""
import io
import itertools
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, BaseModule
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

import boat_mm  # noqa: F401  (installs the allow-list)
from boat_mm.utils import (allow_mmengine_checkpoints,
                           mmengine_checkpoint_globals)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'),
    reason='needs torch >= 2.6 (weights-only loading by default)')


class _Points(Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return dict(inputs=x, target=x.sum(0, keepdim=True))


class _Tiny(BaseModel):

    def __init__(self, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.backbone = nn.Linear(4, 1)

    def forward(self, inputs, target=None, mode='tensor'):
        out = self.backbone(inputs)
        if mode == 'loss':
            return dict(loss=((out - target)**2).mean())
        if mode == 'predict':
            return list(((out - target)**2).detach())
        return out


class _Metric(BaseMetric):
    """Returns numpy scalars, as mmseg's IoUMetric does (np.float32)."""

    def process(self, data_batch, data_samples) -> None:
        self.results += [float(err) for err in data_samples]

    def compute_metrics(self, results: list) -> dict:
        return dict(
            neg_err=np.float32(-np.mean(results)), count=np.int64(len(results)))


_RUN_IDS = itertools.count()


def _runner(work_dir: str, max_iters: int, **kwargs) -> Runner:
    torch.manual_seed(0)  # same initial weights in every run
    # MessageHub instances are global and keyed by the experiment name,
    # which defaults to a timestamp: two runners built in the same second
    # would share (and mix) their logged histories.
    kwargs.setdefault('experiment_name', f'ckpt_test_{next(_RUN_IDS)}')
    loader = dict(
        dataset=_Points(),
        sampler=dict(type='DefaultSampler', shuffle=True),
        batch_size=2,
        num_workers=0,
        collate_fn=dict(type='default_collate'))
    return Runner(
        model=_Tiny(),
        work_dir=work_dir,
        train_dataloader=loader,
        val_dataloader=dict(loader, sampler=dict(type='DefaultSampler',
                                                 shuffle=False)),
        val_evaluator=[_Metric()],
        val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.1)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, end=2),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=2, end=6)
        ],
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook',
                interval=1,
                by_epoch=False,
                save_best='neg_err',
                rule='greater'),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        **kwargs)


class _Recorder(Hook):
    """Hook recording the iteration index and LR of every train step."""
    priority = 'LOWEST'

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        self.seen.append((runner.iter, lr))


@pytest.fixture(scope='module')
def ckpt_2iters(tmp_path_factory) -> str:
    """A checkpoint with full training state, after 2 iterations."""
    work_dir = str(tmp_path_factory.mktemp('run2'))
    _runner(work_dir, 2).train()
    return osp.join(work_dir, 'iter_2.pth')


def _global_names() -> set:
    return {
        g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}'
        for g in mmengine_checkpoint_globals()
    }


def _unsafe_without_allow_list(path: str) -> set:
    """Globals of ``path`` that torch's default allow-list refuses."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    finally:
        torch.serialization.add_safe_globals(saved)


def test_checkpoint_needs_only_the_allow_list(ckpt_2iters):
    work_dir = osp.dirname(ckpt_2iters)
    best = [f for f in ('best_neg_err_iter_1.pth', 'best_neg_err_iter_2.pth')
            if osp.exists(osp.join(work_dir, f))]
    assert len(best) == 1
    for path in (ckpt_2iters, osp.join(work_dir, best[0])):
        unsafe = _unsafe_without_allow_list(path)
        # The checkpoint needs globals beyond torch's defaults, none of them
        # outside our list, and not getattr (see the reducer).
        assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
        assert unsafe <= _global_names(), unsafe - _global_names()
        state = torch.load(path)  # weights_only=True is torch's default
        info = state['message_hub']['runtime_info']
        assert isinstance(info['best_score'], np.float32)
    state = torch.load(ckpt_2iters)
    assert state['meta']['iter'] == 2
    assert {'message_hub', 'optimizer', 'param_schedulers',
            'state_dict'} <= set(state)

    # Without the allow-list the same file is refused: it is what helps.
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(Exception, match='Weights only load failed'):
            torch.load(ckpt_2iters)
    finally:
        torch.serialization.add_safe_globals(saved)
    torch.load(ckpt_2iters)


def test_allow_list_is_idempotent():
    before = len(torch.serialization.get_safe_globals())
    allow_mmengine_checkpoints()
    allow_mmengine_checkpoints()
    assert len(torch.serialization.get_safe_globals()) == before


def test_resume_continues_iteration_lr_and_weights(tmp_path, ckpt_2iters):
    # Reference: 4 uninterrupted iterations.
    full_rec = _Recorder()
    full = _runner(str(tmp_path / 'full'), 4, custom_hooks=[full_rec])
    full.train()
    assert [it for it, _ in full_rec.seen] == [0, 1, 2, 3]
    # The fixture ran iterations 0-1 and stopped; a new runner resumes.
    rec = _Recorder()
    resumed = _runner(
        osp.dirname(ckpt_2iters), 4, resume=True, custom_hooks=[rec])
    resumed.train()
    # It continued at iteration 2 with the LRs of the schedule there (not
    # LinearLR's start again) ...
    assert [it for it, _ in rec.seen] == [2, 3]
    assert [lr for _, lr in rec.seen] == [lr for _, lr in full_rec.seen[2:]]
    assert rec.seen[0][1] != full_rec.seen[0][1]
    assert resumed.iter == 4
    # ... with the weights and optimizer state of iteration 2 and the same
    # data, so it ends bitwise where the uninterrupted run ends ...
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    opt_a = resumed.optim_wrapper.optimizer.state_dict()['state']
    opt_b = full.optim_wrapper.optimizer.state_dict()['state']
    for k in opt_b:
        assert torch.equal(opt_a[k]['exp_avg_sq'], opt_b[k]['exp_avg_sq'])
    # ... and with the logged history (HistoryBuffer) carried over.
    lr_a = resumed.message_hub.get_scalar('train/lr').data[0]
    lr_b = full.message_hub.get_scalar('train/lr').data[0]
    assert len(lr_b) == 4 and np.array_equal(lr_a, lr_b)
    assert resumed.message_hub.get_info('best_score') == \
        full.message_hub.get_info('best_score')


def test_load_from_pretrained_and_load_checkpoint(tmp_path, ckpt_2iters):
    expected = torch.load(ckpt_2iters)['state_dict']['backbone.weight']

    # mmengine.runner.load_checkpoint
    model = _Tiny()
    load_checkpoint(model, ckpt_2iters, map_location='cpu', strict=True)
    assert torch.equal(model.backbone.weight, expected)

    # init_cfg Pretrained with a prefix, as backbones in mmseg configs do.
    class _Backbone(BaseModule):

        def __init__(self):
            super().__init__(
                init_cfg=dict(
                    type='Pretrained',
                    checkpoint=ckpt_2iters,
                    prefix='backbone.'))
            self.weight = nn.Parameter(torch.zeros(1, 4))
            self.bias = nn.Parameter(torch.zeros(1))

    backbone = _Backbone()
    backbone.init_weights()
    assert torch.equal(backbone.weight, expected)

    # load_from in a new runner
    other = _runner(str(tmp_path / 'b'), 1, load_from=ckpt_2iters)
    assert not torch.equal(other.model.backbone.weight, expected)
    other.load_or_resume()
    assert torch.equal(other.model.backbone.weight, expected)


def test_numpy_names_of_the_other_major_version_load():
    """A checkpoint written under numpy 1.x names ``numpy.core``, under 2.x
    ``numpy._core``; both load."""
    buf = io.BytesIO()
    state = dict(a=np.arange(3, dtype=np.float32), s=np.float64(2.5))
    # The legacy format is one plain pickle stream: names can be swapped.
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    new, old = b'numpy._core.multiarray\n', b'numpy.core.multiarray\n'
    assert (new in raw) != (old in raw)
    swapped = raw.replace(new, old) if new in raw else raw.replace(old, new)
    assert swapped != raw
    for data in (raw, swapped):
        loaded = torch.load(io.BytesIO(data))
        assert np.array_equal(loaded['a'], state['a'])
        assert loaded['s'] == 2.5 and isinstance(loaded['s'], np.float64)


class _Evil:

    def __reduce__(self):
        return (print, ('arbitrary code ran', ))


@pytest.mark.parametrize(
    'obj', [
        _Evil(),
        getattr(nn.Linear, 'forward'),
        np.array([1, 'a'], dtype=object),
    ],
    ids=['custom-class', 'getattr', 'object-array'])
def test_arbitrary_pickles_are_still_refused(obj):
    buf = io.BytesIO()
    torch.save({'x': obj}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(buf)
