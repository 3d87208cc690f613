# Copyright (c) boat-mm contributors. All rights reserved.
"""What the tools' shared package (tools/boat_tools) filters (exactly the
upstream warnings that are not the user's concern), its CPU DDP wrapper
and how it imports the public code."""
import logging
import sys
import warnings

import boat_tools
import pytest
from boat_tools.config import _not_internal_warning, adapt_cfg_to_device

PKG_RESOURCES = ('pkg_resources is deprecated as an API. See '
                 'https://setuptools.pypa.io/en/latest/pkg_resources.html.')
PIN_MEMORY = ("'pin_memory' argument is set as true but no accelerator is "
              "found, then device pinned memory won't be used.")


def _shown(message: str, module: str) -> bool:
    """Whether a UserWarning from ``module`` gets through the filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter('always')
        boat_tools.silence_upstream_warnings()
        warnings.warn_explicit(message, UserWarning, 'x.py', 1, module=module)
    return bool(caught)


def test_upstream_warnings_are_filtered_by_message_and_module():
    assert not _shown(PKG_RESOURCES, 'mmengine.utils.package_utils')
    assert not _shown(PKG_RESOURCES, 'importlib')  # mmengine's reloads
    assert not _shown(PIN_MEMORY, 'torch.utils.data.dataloader')
    # The same message from elsewhere, or another message, is shown.
    assert _shown(PKG_RESOURCES, 'user_script')
    assert _shown(PIN_MEMORY, 'user_script')
    assert _shown('something else', 'mmengine.utils.package_utils')


def _record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord('mmengine', level, 'x.py', 1, msg, None, None)


def test_runner_logger_drops_mmengine_file_client_warnings():
    assert not _not_internal_warning(
        _record('"FileClient" will be deprecated in future. Please use io '
                'functions in https://mmengine.readthedocs.io/'))
    assert not _not_internal_warning(
        _record('"HardDiskBackend" is the alias of "LocalBackend" and the '
                'former will be deprecated in future.'))
    assert _not_internal_warning(_record('Checkpoints will be saved to x.'))
    assert _not_internal_warning(
        _record('"FileClient" will be deprecated in future.', logging.ERROR))


def test_public_module_that_fails_to_import_is_not_cached(tmp_path):
    from boat_tools.reference import import_public_module
    model = tmp_path / 'BOAT-Swin' / 'models' / 'boat_swin_transformer.py'
    model.parent.mkdir(parents=True)
    model.write_text('raise RuntimeError("half run")\n')
    name = 'boat_reference_swin'
    cached = sys.modules.pop(name, None)
    try:
        with pytest.raises(RuntimeError, match='half run'):
            import_public_module(str(tmp_path), 'swin')
        assert name not in sys.modules
        model.write_text('VALUE = 7\n')
        assert import_public_module(str(tmp_path), 'swin').VALUE == 7
    finally:
        sys.modules.pop(name, None)
        if cached is not None:
            sys.modules[name] = cached


def test_cpu_ddp_wrapper_keeps_buffers_local_without_deprecation(tmp_path):
    """A distributed CPU run gets MMEngine's DDP wrapper with buffers kept
    per process in forward, without torch's FutureWarning about
    ``broadcast_buffers`` (printed by every process of every run)."""
    import torch
    import torch.distributed as dist
    from mmengine.config import Config
    from mmengine.model import MMDistributedDataParallel
    cfg = adapt_cfg_to_device(
        Config(dict(model=dict(type='X'), launcher='pytorch')), cuda=False)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    wrapper = cfg.model_wrapper_cfg
    assert wrapper.type == 'MMDistributedDataParallel'
    assert wrapper.device_ids is None

    dist.init_process_group(
        'gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            ddp = MMDistributedDataParallel(
                module=torch.nn.BatchNorm1d(2),
                **{
                    k: v
                    for k, v in wrapper.items() if k != 'type'
                })
    finally:
        dist.destroy_process_group()
    assert not [
        str(w.message) for w in caught if 'broadcast_buffers' in str(w.message)
    ]
    assert ddp.broadcast_buffers is False  # the forward sync (any torch)


def test_close_dist_frees_the_ddp_wrapper_before_the_group(tmp_path):
    """A finished run's DDP wrapper, held in the runner's reference cycles,
    holds the process group; close_dist frees it while the interpreter is
    fully alive, then destroys the group (left to the interpreter's
    teardown, gloo's threads aborted about one run in ten). The automatic
    collector is off here, as it may not have run when a tool ends."""
    import gc
    import types
    import weakref

    import torch
    import torch.distributed as dist
    from boat_tools.config import close_dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group(
        'gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    gc.disable()
    try:
        runner = types.SimpleNamespace(
            model=DistributedDataParallel(torch.nn.Linear(2, 2)))
        runner.runner = runner  # a cycle, as hooks and runner make
        wrapper = weakref.ref(runner.model)
        del runner
        assert wrapper() is not None
        close_dist()
        assert wrapper() is None
        assert not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cpu_process_group_takes_the_config_timeout(monkeypatch,
                                                    fake_process_group):
    """A CPU run under torchrun starts a gloo group with the config's
    ``dist_cfg`` (its timeout in seconds, which torch takes as a
    timedelta); not with CUDA, without a launcher, or once a group
    exists; MPI is refused, naming the launchers that work (slurm:
    test_slurm_launch.py)."""
    import datetime

    import torch
    import torch.distributed as dist
    from boat_tools.config import init_cpu_dist
    from mmengine.config import Config
    started = fake_process_group
    cfg = Config(
        dict(
            launcher='pytorch',
            env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=1800))))
    assert init_cpu_dist(cfg)
    assert started == [
        dict(backend='gloo', timeout=datetime.timedelta(seconds=1800))
    ]
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'  # the config is kept
    assert not init_cpu_dist(Config(dict(launcher='none')))
    with pytest.raises(
            RuntimeError,
            match="with `--launcher pytorch`.*"
            "`--launcher slurm`.*not 'mpi'"):
        init_cpu_dist(Config(dict(launcher='mpi')))
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    assert not init_cpu_dist(cfg)
    monkeypatch.setattr(dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert not init_cpu_dist(cfg)
    assert len(started) == 1


def test_total_batch_note():
    """The warning of a run whose total batch is not the one the config's
    learning rate is for, with the two fixes; none when they agree, when
    --auto-scale-lr is on or without a base."""
    from boat_tools.schedule import total_batch_note
    from mmengine.config import Config

    def cfg(batch, **scale):
        return Config(
            dict(train_dataloader=dict(batch_size=batch), auto_scale_lr=scale))

    swin = cfg(64, enable=False, base_batch_size=1024)  # 16xb64
    assert total_batch_note(swin, 16) is None
    assert total_batch_note(swin, 8) == (
        'The learning rate of this config is for a total batch of 1024 '
        "(auto_scale_lr.base_batch_size); this run's is 8 processes x 64 "
        '= 512. Pass --auto-scale-lr to scale the learning rate by '
        '512/1024, or run 16 processes (GPUS=16), or accumulate 2 batches '
        '(`--cfg-options optim_wrapper.accumulative_counts=2`).')
    assert "this run's is one process of 64 = 64." in total_batch_note(swin, 1)
    # Accumulation counts: 8 x 64 x 2 is the recipe's batch.
    swin.optim_wrapper = dict(accumulative_counts=2)
    assert total_batch_note(swin, 8) is None
    assert total_batch_note(swin, 4) == (
        'The learning rate of this config is for a total batch of 1024 '
        "(auto_scale_lr.base_batch_size); this run's is 4 processes x 64 x "
        '2 accumulated (optim_wrapper.accumulative_counts) = 512. Pass '
        '--auto-scale-lr to scale the learning rate by 512/1024, or run 8 '
        'processes (GPUS=8), or accumulate 4 batches (`--cfg-options '
        'optim_wrapper.accumulative_counts=4`).')
    swin.optim_wrapper = dict(accumulative_counts=1)
    # No whole number of processes gives 100 images of 64.
    assert total_batch_note(cfg(64, base_batch_size=100),
                            1).endswith('scale the learning rate by 64/100.')
    assert total_batch_note(cfg(64, base_batch_size=192), 2).endswith(
        'by 128/192, or run 3 processes (GPUS=3).')  # 3 batches of 64 each
    assert total_batch_note(cfg(64, enable=True, base_batch_size=1024),
                            8) is None
    assert total_batch_note(cfg(64), 8) is None
    assert total_batch_note(
        Config(dict(auto_scale_lr=dict(base_batch_size=16))), 8) is None


def test_unfitted_weights_follow_the_backbone_resize():
    """The weights a checkpoint leaves at their initial values (for the
    check of test.py and --resume): a head of another shape and a missing
    weight are listed; BOAT-Swin's position-bias tables of another window
    size are not, as the backbone resizes them on load."""
    import torch.nn as nn
    from boat_tools.config import unfitted_weights

    from boat_mm.models import BOATSwin
    arch = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2))

    def model(window_size, classes):
        return nn.ModuleDict(
            dict(
                backbone=BOATSwin(arch=arch, window_size=window_size),
                head=nn.Linear(64, classes)))

    ckpt = model(6, 3).state_dict()
    del ckpt['backbone.norm3.bias']
    target = model(7, 5)
    assert ckpt['backbone.stages.0.blocks.0.attn.w_msa.'
                'relative_position_bias_table'].shape != target.state_dict()[
                    'backbone.stages.0.blocks.0.attn.w_msa.'
                    'relative_position_bias_table'].shape
    missing, shapes = unfitted_weights(target, ckpt)
    assert missing == ['backbone.norm3.bias']
    assert shapes == [
        'head.weight (checkpoint [3, 64], model [5, 64])',
        'head.bias (checkpoint [3], model [5])'
    ]
    # A model in a wrapper, and the 'module.' keys of a wrapped model's
    # checkpoint, as MMEngine loads them.
    wrapped = nn.Module()
    wrapped.module = target
    assert unfitted_weights(wrapped, {
        f'module.{k}': v
        for k, v in ckpt.items()
    }) == (missing, shapes)


def test_evaluator_metrics_of_each_form():
    """The metrics of an evaluator config and their --cfg-options paths,
    for the three forms MMEngine takes (the top-k and save_best checks
    read them)."""
    from boat_tools.config import evaluator_metrics
    from mmengine.config import Config
    acc, iou = dict(type='Accuracy', topk=(1, 5)), dict(type='IoUMetric')
    cfg = Config(
        dict(
            val_evaluator=acc,
            test_evaluator=dict(type='Evaluator', metrics=[acc, iou])))
    assert evaluator_metrics(cfg, 'val_evaluator') == [('val_evaluator', acc)]
    assert evaluator_metrics(cfg, 'test_evaluator') == [
        ('test_evaluator.metrics.0', acc), ('test_evaluator.metrics.1', iou)
    ]
    cfg = Config(dict(val_evaluator=[iou, acc]))
    assert evaluator_metrics(cfg,
                             'val_evaluator') == [('val_evaluator.0', iou),
                                                  ('val_evaluator.1', acc)]
    assert evaluator_metrics(cfg, 'test_evaluator') == []
