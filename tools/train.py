# Copyright (c) boat-mm contributors. All rights reserved.
"""Train a model from an mmseg, mmpretrain or mmdet config (ours or yours).

Works like the ``tools/train.py`` of mmsegmentation, mmpretrain and
mmdetection, for any of their configs (chosen by the config's
``default_scope``), plus:

* a missing dataset gives an error that says how to get the data;
* CPU runs work unchanged, ``torchrun`` ones included (``gloo``, SyncBN as
  BN), see
  :func:`boat_tools.config.adapt_cfg_to_device`;
* MMEngine's line per parameter and option of ``paramwise_cfg``
  (``paramwise_options -- ...``, hundreds for a BOAT recipe) and its
  warning per frozen parameter go to the log file only; the terminal gets
  one summary line;
* one-line errors, before anything is built, for what MMEngine would
  fail on deep in the run, and warnings for what would silently train
  otherwise than the config's name or schedule says (total batch,
  gradient accumulation, schedulers that end before or after the loop,
  what a resume restores): see :mod:`boat_tools.schedule`,
  :mod:`boat_tools.resume` and :mod:`boat_tools.hooks`.

Examples::

    python tools/train.py configs/boat_upernet_ade20k.py
    python tools/train.py \
        configs/boat_cswin/mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py
    python tools/train.py CONFIG --work-dir work_dirs/x --resume
    python tools/train.py CONFIG --cfg-options model.backbone.init_cfg=None
    bash tools/dist_train.sh CONFIG 8
    GPUS=16 bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR
"""
import argparse
import logging
import os.path as osp
import sys
from copy import deepcopy
from typing import List, Optional

# The tools' shared code (tools/boat_tools); imported before mmengine, as it
# silences mmengine's warnings that are not the user's concern.
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from boat_tools.cli import (ArgumentParser, UsageError, check_checkpoint,
                            load_config, tool_main)
from boat_tools.config import (adapt_cfg_to_device, add_launcher_args,
                               build_runner, check_amp_device,
                               check_checkpoint_fits, check_data_roots,
                               check_datasets, close_dist, init_cpu_dist,
                               merge_common_args, parse_launcher_args)
from boat_tools.hooks import check_save_best, ema_start_note
from boat_tools.resume import (check_resumable, check_resume,
                               missing_training_state)
from boat_tools.schedule import (check_layer_decay, check_loop_units,
                                 check_param_scheduler, check_train_loop,
                                 check_val_interval,
                                 scale_lr_with_accumulation,
                                 schedule_length_note, total_batch_note)
from boat_tools.widths import check_preprocessor_classes
from mmengine.config import Config, ConfigDict
from mmengine.dist import get_world_size
from mmengine.logging import print_log

import boat_mm  # noqa: F401,E402  (registers models, checkpoint allow-list)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or, without a path, from '
        'the latest checkpoint in the work dir (if none yet: from the '
        'config\'s load_from, if any, resumed if a training run wrote it)')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic mixed precision training (needs a GPU)')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='do not evaluate the checkpoints during training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the images of one optimizer step '
        '(processes x batch size x optim_wrapper.accumulative_counts) over '
        '`auto_scale_lr.base_batch_size` of the config')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='disable pin_memory in the dataloaders')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='disable persistent_workers in the dataloaders')
    add_launcher_args(parser)
    return parse_launcher_args(parser, argv)


def _set_dataloader_defaults(cfg: Config, args: argparse.Namespace) -> None:
    """mmpretrain's tools default to ``default_collate`` and pinned,
    persistent workers; mmseg's and mmdet's keep the config's (pseudo)
    collate."""
    defaults = ConfigDict()
    if cfg.get('default_scope') == 'mmpretrain':
        defaults = ConfigDict(
            pin_memory=True,
            persistent_workers=True,
            collate_fn=dict(type='default_collate'))
    for field in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(field) is None:
            continue
        loader = deepcopy(defaults)
        loader.update(cfg[field])
        if args.no_pin_memory:
            loader['pin_memory'] = False
        if args.no_persistent_workers:
            loader['persistent_workers'] = False
        cfg[field] = loader


def merge_args(cfg: Config, args: argparse.Namespace) -> Config:
    """Merge the command line into the config.

    ``--cfg-options`` come first; the dedicated flags (``--work-dir``,
    ``--amp``, ``--resume``, ...) are applied on top of them. The merged
    config is then checked for what it could not train.
    """
    merge_common_args(cfg, args)

    if args.amp:
        import torch
        if not torch.cuda.is_available():
            raise UsageError(
                '--amp needs a CUDA device (MMEngine\'s AmpOptimWrapper does '
                'not run on the CPU); drop --amp to train in float32.')
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print_log(
                'AMP training is already enabled in your config.',
                logger='current',
                level=logging.WARNING)
        elif wrapper != 'OptimWrapper':
            raise UsageError(
                f'--amp works with optim_wrapper.type=OptimWrapper, the '
                f'config has {wrapper!r}.')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    if args.resume == 'auto':
        # What MMEngine's find_latest_checkpoint reads.
        latest = osp.join(cfg.work_dir, 'last_checkpoint')
        if cfg.get('load_from') and not osp.exists(latest):
            check_checkpoint(cfg.load_from, 'load_from')
            # Nothing to resume yet: MMEngine would start from scratch, the
            # config's load_from dropped (as upstream tools do); a job
            # script that always passes --resume starts from it instead,
            # resuming it if a run wrote it (as mmseg's --resume does).
            cfg.resume = missing_training_state(cfg.load_from) == []
            print_log(
                f'--resume: no checkpoint in {cfg.work_dir} yet; '
                f'{"resuming" if cfg.resume else "starting from"} '
                f'load_from={cfg.load_from}.',
                logger='current')
        else:
            cfg.resume = True
            cfg.load_from = None
    elif args.resume is not None:
        check_resumable(args.resume)
        cfg.resume = True
        cfg.load_from = args.resume
    elif cfg.get('load_from'):
        check_checkpoint(cfg.load_from, 'load_from')

    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise UsageError(
                '--auto-scale-lr needs `auto_scale_lr = dict(enable=False, '
                'base_batch_size=N)` in the config (N = the total batch size '
                'the learning rate was tuned for).')
        cfg.auto_scale_lr.enable = True

    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    check_train_loop(cfg)
    check_param_scheduler(cfg)
    check_loop_units(cfg)
    check_val_interval(cfg)
    check_layer_decay(cfg)
    check_save_best(cfg)
    check_preprocessor_classes(cfg)
    check_amp_device(cfg)
    _set_dataloader_defaults(cfg, args)
    return cfg


@tool_main
def main(argv: Optional[List[str]] = None) -> None:
    """Train as the command line (``argv``, else ``sys.argv[1:]``) says."""
    args = parse_args(argv)
    cfg = merge_args(load_config(args.config, options_follow=True), args)
    check_datasets(cfg, ('train_dataloader', 'val_dataloader'))
    check_data_roots(cfg, ('train_dataloader', 'val_dataloader'))
    adapt_cfg_to_device(cfg)
    init_cpu_dist(cfg)

    runner = build_runner(cfg)
    if cfg.get('resume'):  # load_from may be of another model: fine-tuning
        check_checkpoint_fits(runner, '--resume')
        check_resume(runner, args.resume if args.resume != 'auto' else '')
    scale_lr_with_accumulation(runner, cfg)
    # After the runner started the process group (on GPUs, it does).
    notes = (total_batch_note(cfg,
                              get_world_size()), schedule_length_note(cfg),
             ema_start_note(runner))
    for note in filter(None, notes):
        print_log(note, logger='current', level=logging.WARNING)
    runner.train()


if __name__ == '__main__':
    main()
    close_dist()
