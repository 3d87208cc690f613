# Copyright (c) boat-mm contributors. All rights reserved.
"""MMEngine checkpoints written with boat_mm imported load weights-only."""
import io
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

import boat_mm  # noqa: F401  (installs the allow-list)


class _Points(Dataset):

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
        return out


def _runner(work_dir: str, max_iters: int, **kwargs) -> Runner:
    torch.manual_seed(0)  # same initial weights in every run
    return Runner(
        model=_Tiny(),
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=_Points(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=2,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.1)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, end=2),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=2, end=6)
        ],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
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


def test_resume_continues_iteration_lr_and_weights(tmp_path):
    # Reference: 4 uninterrupted iterations.
    full_rec = _Recorder()
    full = _runner(str(tmp_path / 'full'), 4, custom_hooks=[full_rec])
    full.train()
    assert [it for it, _ in full_rec.seen] == [0, 1, 2, 3]
    # Interrupted: 2 iterations, then a new runner resumes to 4.
    _runner(str(tmp_path / 'run'), 2).train()
    ckpt = osp.join(str(tmp_path / 'run'), 'iter_2.pth')
    state = torch.load(ckpt)  # weights_only=True is torch's default
    assert state['meta']['iter'] == 2
    assert 'message_hub' in state and 'optimizer' in state

    rec = _Recorder()
    resumed = _runner(
        str(tmp_path / 'run'), 4, resume=True, custom_hooks=[rec])
    resumed.train()
    # It continued at iteration 2 with the LR the schedule had there ...
    assert [it for it, _ in rec.seen] == [2, 3]
    for (_, lr), (_, ref_lr) in zip(rec.seen, full_rec.seen[2:]):
        assert lr == pytest.approx(ref_lr)
    # ... and with the weights and optimizer state of iteration 2.
    assert resumed.iter == 4
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b)


def test_load_from_pretrained_and_load_checkpoint(tmp_path):
    run = _runner(str(tmp_path / 'a'), 1)
    run.train()
    ckpt = osp.join(str(tmp_path / 'a'), 'iter_1.pth')
    expected = run.model.backbone.weight.detach().clone()

    # mmengine.runner.load_checkpoint
    model = _Tiny()
    load_checkpoint(model, ckpt, map_location='cpu', strict=True)
    torch.testing.assert_close(model.backbone.weight, expected)

    # init_cfg Pretrained with a prefix, as backbones in mmseg configs do.
    from mmengine.model import BaseModule

    class _Backbone(BaseModule):

        def __init__(self):
            super().__init__(
                init_cfg=dict(
                    type='Pretrained', checkpoint=ckpt, prefix='backbone.'))
            self.weight = nn.Parameter(torch.zeros(1, 4))
            self.bias = nn.Parameter(torch.zeros(1))

    backbone = _Backbone()
    backbone.init_weights()
    torch.testing.assert_close(backbone.weight, expected)

    # load_from in a new runner
    other = _runner(str(tmp_path / 'b'), 1, load_from=ckpt)
    other.load_or_resume()
    torch.testing.assert_close(other.model.backbone.weight, expected)


class _Evil:

    def __reduce__(self):
        return (print, ('arbitrary code ran',))


def test_arbitrary_pickles_are_still_refused():
    buf = io.BytesIO()
    torch.save({'x': _Evil()}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(buf)
    # getattr is not allow-listed (HistoryBuffer is pickled without it).
    buf = io.BytesIO()
    torch.save({'f': getattr(nn.Linear, 'forward')}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(buf)
