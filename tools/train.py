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
* warnings for what would silently train otherwise than the config's
  name or schedule says (total batch, gradient accumulation, schedulers
  that end before or after the loop, what a resume restores).

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
import functools
import logging
import os.path as osp
import pickle
import sys
from copy import deepcopy
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

# The tools' shared code (tools/boat_tools); imported before mmengine, as it
# silences mmengine's warnings that are not the user's concern.
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from boat_tools.cli import (ArgumentParser, UsageError, check_checkpoint,
                            load_config, tool_main)
from boat_tools.config import (accumulation_steps, adapt_cfg_to_device,
                               add_launcher_args, build_runner,
                               check_checkpoint_fits, check_data_roots,
                               check_datasets, close_dist, init_cpu_dist,
                               merge_common_args, parse_launcher_args,
                               total_batch_note)
from mmengine.config import Config, ConfigDict
from mmengine.dist import get_world_size
from mmengine.logging import print_log

import boat_mm  # noqa: F401,E402  (registers models, checkpoint allow-list)

if TYPE_CHECKING:
    from mmengine.runner import Runner


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


def missing_training_state(path: str) -> Optional[List[str]]:
    """What a checkpoint lacks of the training state that MMEngine's
    ``Runner.resume`` reads besides the weights (``meta.epoch``,
    ``meta.iter``, ``message_hub``).

    Only the file's structure is read (``mmap``). Remote files, and files
    that weights-only loading refuses or cannot map, give None: left to
    MMEngine (and its convert-first hint).

    Args:
        path (str): A checkpoint path or URL.

    Returns:
        list[str] | None: The missing entries (empty for a checkpoint
        written by a training run), or None when not known.
    """
    if '://' in path or not osp.isfile(path):
        return None
    import torch
    try:
        ckpt = torch.load(
            path, map_location='cpu', weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError):
        return None
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    missing = [f'meta.{k}' for k in ('epoch', 'iter') if k not in meta]
    if not isinstance(ckpt, dict) or 'message_hub' not in ckpt:
        missing.append('message_hub')
    return missing


def check_resumable(path: str) -> None:
    """Raise a :class:`UsageError` unless ``--resume PATH`` can be resumed:
    a weights-only file (converted by ``boat2mm.py``, or a bare state dict)
    would otherwise load into the model, then fail with a bare
    ``KeyError: 'epoch'`` (see :func:`missing_training_state`).

    Args:
        path (str): The path given to ``--resume``.
    """
    if '://' not in path:
        check_checkpoint(path)
    missing = missing_training_state(path)
    if missing:
        raise UsageError(
            f'--resume {path!r}: the file holds weights without the '
            f'training state a resume needs ({", ".join(missing)} '
            f'missing): it was not written by a training run. To start a '
            f'new run from these weights, pass `--cfg-options '
            f'load_from={path}` instead of --resume; to continue a run, '
            f'pass its WORK_DIR/iter_N.pth or epoch_N.pth, or --resume '
            f'alone for the latest checkpoint of --work-dir.')


def check_amp_device(cfg: Config) -> None:
    """Raise a :class:`UsageError` for a config that trains with AMP on a
    machine without the devices MMEngine's ``AmpOptimWrapper`` runs on
    (it would assert deep inside the building of the runner).

    Args:
        cfg (Config): The merged config.
    """
    from mmengine.device import (is_cuda_available, is_mlu_available,
                                 is_musa_available, is_npu_available)
    wrapper = str((cfg.get('optim_wrapper') or {}).get('type', ''))
    if not wrapper.endswith('AmpOptimWrapper'):
        return
    if (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available()):
        return
    raise UsageError(
        f'the config trains with AMP (optim_wrapper.type={wrapper!r}), '
        f'which MMEngine runs on a GPU only, and torch sees no CUDA device '
        f'here: to train on the CPU in float32, pass `--cfg-options '
        f'optim_wrapper.type=OptimWrapper`; on a GPU machine, check that '
        f'torch.cuda.is_available().')


def merge_args(cfg: Config, args: argparse.Namespace) -> Config:
    """Merge the command line into the config.

    ``--cfg-options`` come first; the dedicated flags (``--work-dir``,
    ``--amp``, ``--resume``, ...) are applied on top of them.
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


#: What a short run is told to do about the recipe's scheduler.
_SHORT_RUN_FIX = ('give a child config its own param_scheduler, as "Shorter '
                  'ImageNet runs" in configs/boat_swin/README.md and '
                  'configs/boat_cswin/README.md shows')


def _loop_class(train_cfg: Any) -> Optional[type]:
    """MMEngine's epoch or iteration loop that ``train_cfg`` builds
    (``type``, or ``by_epoch`` as the runner reads it); None for another
    loop, or no ``train_cfg``."""
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
    if not isinstance(train_cfg, dict):
        return None
    loops = {
        'EpochBasedTrainLoop': EpochBasedTrainLoop,
        'IterBasedTrainLoop': IterBasedTrainLoop
    }
    if 'type' in train_cfg:
        return loops.get(train_cfg['type'])
    if 'by_epoch' not in train_cfg:
        return None
    return EpochBasedTrainLoop if train_cfg['by_epoch'] else IterBasedTrainLoop


def _loop_unit(loop: type) -> Tuple[str, str]:
    """``('epoch', 'max_epochs')`` for MMEngine's epoch loop,
    ``('iteration', 'max_iters')`` for its iteration loop."""
    return (('epoch',
             'max_epochs') if loop.__name__ == 'EpochBasedTrainLoop' else
            ('iteration', 'max_iters'))


def _scheduler_list(cfg: Config) -> Optional[list]:
    """``param_scheduler`` as a list (one scheduler alone in one); None
    without any, or with one list per optimizer (a dict of them)."""
    schedulers = cfg.get('param_scheduler')
    if isinstance(schedulers, dict) and 'type' in schedulers:
        return [schedulers]
    return schedulers if isinstance(schedulers, list) else None


def check_train_loop(cfg: Config) -> None:
    """Refuse a ``train_cfg`` key that its loop does not take (e.g.
    ``max_iters`` in an epoch-based one), which the runner meets as a
    ``TypeError`` of the loop's ``__init__``.

    Args:
        cfg (Config): The merged config.
    """
    import inspect
    train_cfg = cfg.get('train_cfg')
    loop = _loop_class(train_cfg)
    if loop is None:
        return
    takes = [
        k for k in inspect.signature(loop.__init__).parameters
        if k not in ('self', 'runner', 'dataloader')
    ]
    # (_scope_: MMEngine's note of the scope a config came from.)
    odd = [
        k for k in train_cfg
        if k not in takes + ['type', 'by_epoch'] and not k.startswith('_')
    ]
    if not odd:
        return
    key, other, other_key = (('max_epochs', 'iteration', 'max_iters')
                             if loop.__name__ == 'EpochBasedTrainLoop' else
                             ('max_iters', 'epoch', 'max_epochs'))
    # by_epoch alone does not do: the other loop refuses this one's length.
    by_epoch = other == 'epoch'
    fix = (f'set train_cfg.{key} instead; an {other}-based run needs a '
           f'child config that replaces train_cfg (`train_cfg = '
           f'dict(_delete_=True, by_epoch={by_epoch}, {other_key}=N)`)' +
           (', gives train_dataloader a DefaultSampler' if by_epoch else '') +
           f' and sets by_epoch={by_epoch} in its param_scheduler, '
           f'default_hooks.checkpoint and log_processor')
    raise UsageError(
        f'train_cfg has {", ".join(odd)}, which MMEngine\'s {loop.__name__} '
        f'does not take (it takes {", ".join(takes)}): {fix}')


def check_param_scheduler(cfg: Config) -> None:
    """Refuse a scheduler of ``param_scheduler`` that would end before it
    begins, e.g. the recipe's cosine phase from epoch 20 with
    ``train_cfg.max_epochs=2``: MMEngine's runner sets a missing ``end`` to
    the loop's length and the scheduler refuses ``end <= begin``.

    Args:
        cfg (Config): The merged config.
    """
    train_cfg = cfg.get('train_cfg')
    schedulers = _scheduler_list(cfg)
    loop = _loop_class(train_cfg)
    if loop is None or schedulers is None:
        return  # another loop, or one scheduler list per optimizer
    epochs = loop.__name__ == 'EpochBasedTrainLoop'
    length = train_cfg.get(_loop_unit(loop)[1])
    for i, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, dict):
            continue
        by_epoch = scheduler.get('by_epoch', True)
        begin = scheduler.get('begin', 0)
        end = scheduler.get('end')
        default = None
        if end is None and by_epoch == epochs and length is not None:
            # The runner's default (that of the other unit needs the data).
            default = f'train_cfg.{"max_epochs" if epochs else "max_iters"}'
            end = length
        if end is None or end > begin:
            continue
        unit = 'epoch' if by_epoch else 'iteration'
        ends = (f'ends at {default}={end}' if default else f'ends at {end}')
        raise UsageError(
            f'param_scheduler[{i}] ({scheduler.get("type")}) begins at {unit} '
            f'{begin} and {ends}, and MMEngine needs end > begin: for a run '
            f'this short, {_SHORT_RUN_FIX}')


def check_loop_units(cfg: Config) -> None:
    """Refuse what counts in units the training loop never ends, which
    MMEngine runs silently: in an iteration-based loop, a scheduler by
    epoch never steps (the learning rate stays at its first value) and a
    checkpoint hook by epoch saves only when the run ends; in an
    epoch-based loop, an ``InfiniteSampler`` (mmseg's) never ends an
    epoch.

    Args:
        cfg (Config): The merged config.
    """
    train_cfg = cfg.get('train_cfg')
    loop = _loop_class(train_cfg)
    if loop is None:
        return
    problems = []
    if loop.__name__ == 'EpochBasedTrainLoop':
        sampler = (cfg.get('train_dataloader') or {}).get('sampler') or {}
        if str(sampler.get('type', '')).endswith('InfiniteSampler'):
            problems.append(
                'train_dataloader.sampler is an InfiniteSampler, which never '
                'ends an epoch: set `train_dataloader = dict(sampler=dict('
                "_delete_=True, type='DefaultSampler', shuffle=True))`")
    else:
        by_epoch = [
            f'[{i}] ({scheduler.get("type")})'
            for i, scheduler in enumerate(_scheduler_list(cfg) or [])
            if isinstance(scheduler, dict) and scheduler.get('by_epoch', True)
            and not scheduler.get('convert_to_iter_based')
        ]
        if by_epoch:
            one = len(by_epoch) == 1
            problems.append(
                f'param_scheduler{", ".join(by_epoch)} '
                f'{"counts" if one else "count"} epochs (by_epoch=True), so '
                f'{"it never steps" if one else "they never step"} and the '
                'learning rate stays at its first value: set by_epoch=False '
                'with begin and end in iterations')
        hook = (cfg.get('default_hooks') or {}).get('checkpoint')
        if isinstance(hook, dict) and hook.get('by_epoch', True):
            problems.append(
                'default_hooks.checkpoint counts epochs (by_epoch=True), so '
                'it saves only when the run ends: set '
                '`default_hooks = dict(checkpoint=dict(by_epoch=False, '
                'interval=N))` with N in iterations')
    if problems:
        raise UsageError(f'train_cfg builds MMEngine\'s {loop.__name__}, '
                         'but ' + '; '.join(problems))


def check_val_interval(cfg: Config) -> None:
    """Refuse a ``train_cfg.val_interval`` below 1 in a run that
    validates: MMEngine's loops take the step modulo it
    (``ZeroDivisionError`` at the first iteration, or no validation at all
    for a negative one).

    Args:
        cfg (Config): The merged config.
    """
    train_cfg = cfg.get('train_cfg')
    loop = _loop_class(train_cfg)
    if loop is None or cfg.get('val_cfg') is None:
        return
    interval = train_cfg.get('val_interval', 1)
    if isinstance(interval, (int, float)) and interval >= 1:
        return
    raise UsageError(
        f'train_cfg.val_interval={interval!r}: MMEngine validates every '
        f'val_interval {_loop_unit(loop)[0]}s, which must be 1 or more; to '
        f'train without validating, pass --no-validate')


def check_layer_decay(cfg: Config) -> None:
    """Refuse ``paramwise_cfg.layer_decay_rate`` without a constructor
    that reads it: MMEngine's default constructor drops it, and every
    layer trains at the full learning rate.

    Args:
        cfg (Config): The merged config.
    """
    wrapper = cfg.get('optim_wrapper')
    if not isinstance(wrapper, dict):
        return
    paramwise = wrapper.get('paramwise_cfg') or {}
    constructor = str(wrapper.get('constructor') or '').split('.')[-1]
    if 'layer_decay_rate' not in paramwise or constructor not in (
            '', 'DefaultOptimWrapperConstructor'):
        return
    fix = ("set optim_wrapper.constructor='"
           "LearningRateDecayOptimWrapperConstructor' (mmpretrain's, as "
           "boat-mm's SimMIM fine-tuning configs do)"
           if cfg.get('default_scope') == 'mmpretrain' else
           "set optim_wrapper.constructor to a layer-decay constructor that "
           "knows the model (mmpretrain's "
           "LearningRateDecayOptimWrapperConstructor takes classifiers only: "
           "it needs the model's get_layer_depth), or remove it")
    raise UsageError(
        f'optim_wrapper.paramwise_cfg.layer_decay_rate='
        f'{paramwise["layer_decay_rate"]} is read by a layer-decay '
        f'constructor only, and MMEngine\'s default one drops it (every '
        f'layer would train at the full learning rate): {fix}')


def _synthetic_results(metric: Any) -> Optional[list]:
    """One processed batch for the metrics whose names do not depend on
    the data (mmseg's IoUMetric, mmpretrain's Accuracy), to ask the metric
    itself what it reports; None for the others."""
    import torch
    kind = type(metric).__name__
    if kind == 'IoUMetric' and not getattr(metric, 'format_only', False):
        metric.dataset_meta = dict(classes=('a', 'b'))
        return [tuple(torch.ones(2) for _ in range(4))]
    if kind == 'Accuracy' and hasattr(metric, 'topk'):
        classes = max(metric.topk) + 1
        return [
            dict(
                pred_score=torch.full((classes, ), 1 / classes),
                gt_label=torch.tensor([0]))
        ]
    return None


def _evaluator_keys(cfg: Config) -> Optional[List[str]]:
    """The keys of what ``val_evaluator`` reports, asked of its metrics on
    one synthetic batch; None unless every metric is one that can be
    asked (see :func:`_synthetic_results`)."""
    from mmengine.logging import MMLogger
    from mmengine.registry import METRICS, init_default_scope
    evaluator = cfg.get('val_evaluator')
    if isinstance(evaluator, dict) and 'metrics' in evaluator:
        evaluator = evaluator['metrics']
    metrics = evaluator if isinstance(evaluator, list) else [evaluator]
    if not metrics or not all(isinstance(m, dict) for m in metrics):
        return None
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    logger = MMLogger.get_current_instance()
    level = logger.level
    keys = []
    try:
        logger.setLevel(logging.ERROR)  # IoUMetric logs a table per class
        for metric_cfg in metrics:
            metric = METRICS.build(deepcopy(metric_cfg))
            results = _synthetic_results(metric)
            if results is None:
                return None
            metric.results = results
            keys += list(metric.evaluate(len(results)))
    except Exception:  # a metric this check cannot ask: the run will
        return None
    finally:
        logger.setLevel(level)
    return keys


def check_save_best(cfg: Config) -> None:
    """Refuse ``default_hooks.checkpoint.save_best`` naming a metric that
    validation does not report: MMEngine's CheckpointHook stops the run at
    its first validation (``KeyError``), 16000 iterations into an mmseg
    recipe. Only for metrics whose names do not depend on the data
    (:func:`_evaluator_keys`).

    Args:
        cfg (Config): The merged config.
    """
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if not isinstance(hook, dict) or cfg.get('val_cfg') is None:
        return
    best = hook.get('save_best')
    wanted = [best] if isinstance(best, str) else list(best or [])
    wanted = [k for k in wanted if k != 'auto']
    if not wanted:
        return
    keys = _evaluator_keys(cfg)
    unknown = [k for k in wanted if keys is not None and k not in keys]
    if unknown:
        raise UsageError(
            f'default_hooks.checkpoint.save_best={best!r}: validation '
            f'reports {", ".join(keys)}, not {", ".join(unknown)}, and '
            f'MMEngine\'s CheckpointHook would stop the run at its first '
            f'validation: name one of those, or \'auto\' (the first)')


def check_preprocessor_classes(cfg: Config) -> None:
    """Refuse a classifier whose data preprocessor counts other classes
    than its head: e.g. a child config that sets
    ``model.head.num_classes=3`` keeps mmpretrain's ImageNet
    ``data_preprocessor.num_classes=1000``, the width of the one-hot
    targets of Mixup/CutMix (``model.train_cfg.augments``), and the loss
    fails at the first iteration (``LabelSmoothLoss requires output and
    target to be same shape``).

    MMEngine's runner gives the model the top-level ``data_preprocessor``
    when ``model`` has none; a head or preprocessor without
    ``num_classes``, or a preprocessor that makes no one-hot targets, is
    left alone.

    Args:
        cfg (Config): The merged config.
    """
    model = cfg.get('model')
    if not isinstance(model, dict):
        return
    head = model.get('head')
    key, preprocessor = 'model.data_preprocessor', model.get(
        'data_preprocessor')
    if preprocessor is None:  # as MMEngine's Runner.__init__ does
        key, preprocessor = 'data_preprocessor', cfg.get('data_preprocessor')
    if not (isinstance(head, dict) and isinstance(preprocessor, dict)):
        return
    classes, width = head.get('num_classes'), preprocessor.get('num_classes')
    if classes is None or width is None or classes == width:
        return
    # mmpretrain's ImageClassifier gives model.train_cfg to its
    # preprocessor as batch_augments, which turn to_onehot on; without
    # one-hot targets the preprocessor's num_classes is unused (mmpretrain's
    # resnet50_8xb128_coslr-90e_in21k.py has 21843 and 21842).
    if not (preprocessor.get('to_onehot')
            or preprocessor.get('batch_augments', model.get('train_cfg'))):
        return
    fix = (f'data_preprocessor = dict(num_classes={classes})'
           if key == 'data_preprocessor' else
           f'model = dict(data_preprocessor=dict(num_classes={classes}))')
    raise UsageError(
        f'model.head.num_classes={classes} but {key}.num_classes={width} '
        f'(the width of the one-hot targets that Mixup/CutMix mix; the loss '
        f'would refuse the shapes at the first iteration): set `{fix}` in '
        f'your config, or pass `--cfg-options {key}.num_classes={classes}`')


#: The share of an EMA's first weights, still in its average at the end
#: of the run, above which :func:`ema_start_note` warns.
EMA_KEPT_MAX = 0.5
#: The share the momentum it suggests keeps.
EMA_KEPT_FIX = 0.01


def ema_start_note(runner: 'Runner') -> Optional[str]:
    """A warning for an ``EMAHook`` whose average, at the end of the run,
    is still mostly the weights it started from: the momentum of an
    ImageNet recipe (BOAT-CSWin-T's 1.6e-4, for ~187k iterations) over a
    fine-tuning run of 1000 iterations keeps 85 % of them (a new head at
    random), and validation, the checkpoints' ``state_dict`` and
    ``test.py`` use the average.

    Counts as MMEngine does: the hook averages from ``begin_iter`` (or
    ``begin_epoch``), its first update copies the model, and each later
    ``interval``-th one takes ``momentum`` of the model's weights
    (``ExponentialMovingAverage``; other averages are left alone). Reads
    ``runner.train_loop``, which builds the loop and its dataloader as
    ``runner.train()`` would first thing, and which it then reuses.

    Args:
        runner (Runner): The runner, before ``train()``.

    Returns:
        str | None: The warning, or None.
    """
    from mmengine.hooks import EMAHook
    from mmengine.model import ExponentialMovingAverage
    hooks = [h for h in runner.hooks if isinstance(h, EMAHook)]
    ema_type = hooks[0].ema_cfg.get('type') if hooks else None
    if isinstance(ema_type, str):
        ema_type = ema_type.split('.')[-1]
    if ema_type not in ('ExponentialMovingAverage', ExponentialMovingAverage):
        return None
    hook = hooks[0]
    loop = runner.train_loop
    total = getattr(loop, 'max_iters', None)
    if total is None:  # no training loop, or one without a length
        return None
    # EMAHook._ema_started: from iteration (or epoch) begin - 1, 0-based.
    first = max(hook.begin_iter - 1, 0)
    if hook.enabled_by_epoch:
        first = max(hook.begin_epoch - 1, 0) * len(loop.dataloader)
    calls = total - first
    interval = hook.ema_cfg.get('interval', 1)
    updates = max(calls - 1, 0) // interval
    momentum = hook.ema_cfg.get('momentum', 0.0002)
    kept = (1 - momentum)**updates
    if calls <= 0 or kept <= EMA_KEPT_MAX:
        return None
    start = ('the weights after the first iteration, i.e. those the run '
             'starts from (in fine-tuning, a new head at random)'
             if first == 0 else f'the weights after iteration {first + 1}')
    users = ('validation, ' if getattr(hook, 'evaluate_on_ema', True) else
             '') + "the checkpoints' state_dict and test.py"
    what = ('parameters and buffers'
            if hook.ema_cfg.get('update_buffers') else 'parameters')
    every = f', every {interval} iterations' if interval > 1 else ''
    fix = ''
    if updates:
        better = 1 - EMA_KEPT_FIX**(1 / updates)
        fix = (f' or set a momentum that keeps little of them, e.g. '
               f'momentum={better:.3g} keeps {EMA_KEPT_FIX:.0%} in this run')
    return (f'EMAHook: momentum={momentum:g} (the weight of the model in '
            f'each update of the average, as MMEngine\'s '
            f'ExponentialMovingAverage defines it) over the {calls} of this '
            f"run's {total} iterations it averages ({updates} updates"
            f'{every}) leaves {kept:.1%} of the averaged {what} at {start}, '
            f'and {users} use the averaged weights: for a run this short, '
            f'remove the hook (`custom_hooks = []`){fix}.')


#: Schedulers that end at the configured rate: when the last of a
#: schedule ends early, the run goes on at a constant rate, as meant.
_WARMUPS = ('LinearLR', 'ConstantLR', 'QuadraticWarmupLR')


def schedule_length_note(cfg: Config) -> Optional[str]:
    """A warning when the schedulers of the training loop's unit end at
    another point than the loop: MMEngine gives a missing ``end`` the
    loop's length, but an explicit one (mmseg's ``PolyLR(end=160000)``, a
    config variable that ``--cfg-options train_cfg.max_iters=N`` does not
    change) stays, so a longer run trains its tail at the schedule's last
    value (0 for PolyLR) and a shorter one stops before the learning rate
    has fallen.

    Args:
        cfg (Config): The merged config.

    Returns:
        str | None: The warning, or None.
    """
    train_cfg = cfg.get('train_cfg')
    loop = _loop_class(train_cfg)
    schedulers = _scheduler_list(cfg)
    if loop is None or not schedulers:
        return None
    unit, key = _loop_unit(loop)
    length = train_cfg.get(key)
    ends = [
        (scheduler.get('end', length), i, scheduler.get('type'))
        for i, scheduler in enumerate(schedulers)
        if isinstance(scheduler, dict) and scheduler.get('by_epoch', True) == (
            unit == 'epoch')
    ]
    if length is None or not ends or None in [e[0] for e in ends]:
        return None
    end, i, kind = max(ends, key=lambda e: e[0])
    if end == length or (end < length
                         and str(kind).split('.')[-1] in _WARMUPS):
        return None  # a warm-up alone: the rate stays at the config's
    effect = (f'from {unit} {end} on, the learning rate stays at the '
              f'schedule\'s last value' if end < length else
              'the run stops before the schedule has run its course')
    # One scheduler may be given alone, as a dict: no index then.
    alone = isinstance(cfg.get('param_scheduler'), dict)
    name, option = (('param_scheduler', 'param_scheduler') if alone else
                    (f'param_scheduler[{i}]', f'param_scheduler.{i}'))
    return (f'{name} ({kind}) ends at {unit} {end}, the training loop at '
            f'train_cfg.{key}={length}: {effect}. Set its end to {length} '
            f'(`--cfg-options {option}.end={length}`), or leave end out and '
            f'MMEngine ends it with the loop.')


def _saved_groups(state: Any) -> List[dict]:
    """The parameter groups of an optimizer state dict (or of a dict of
    them: one optimizer per model part, by name), in order."""
    if not isinstance(state, dict):
        return []
    if 'param_groups' in state:
        return list(state['param_groups'])
    return [g for key in sorted(state) for g in _saved_groups(state[key])]


def _run_groups(wrapper: Any) -> List[dict]:
    """The parameter groups of the run's optimizers, in the order of
    :func:`_saved_groups` (read from the optimizers themselves:
    ``OptimWrapper.param_groups`` adds one, and a sharded optimizer's
    ``state_dict`` is empty on all processes but one)."""
    wrappers = getattr(wrapper, 'optim_wrappers', None)  # OptimWrapperDict
    if isinstance(wrappers, dict):
        return [
            g for key in sorted(wrappers)
            for g in wrappers[key].optimizer.param_groups
        ]
    return list(wrapper.optimizer.param_groups)


#: What a user who wants a changed config to take effect does instead.
_NEW_RUN = ('start a new run from its weights with `--cfg-options '
            'load_from=FILE` (without --resume)')


def check_resume(runner: 'Runner', resume_from: str) -> None:
    """Check what a resumed run restores from its checkpoint against the
    config it runs with, when ``runner.train()`` loads it (the optimizer
    and schedulers are built then).

    Refuses an optimizer state whose parameter groups are not those of the
    run's optimizer (``frozen_stages``, ``paramwise_cfg`` or the
    architecture changed), which torch meets as ``ValueError: loaded state
    dict has a different number of parameter groups``. Warns when the run
    will not do what its config says because MMEngine restores the
    checkpoint's state: a finished run (nothing left to train), another
    learning rate (the config's, or ``--auto-scale-lr``'s), another end of
    a scheduler.

    Args:
        runner (Runner): The runner, before ``train()``.
        resume_from (str): The checkpoint, as the user named it.
    """
    load = runner.load_checkpoint

    @functools.wraps(load)
    def load_checkpoint(filename: str, *args, **kwargs) -> dict:
        checkpoint = load(filename, *args, **kwargs)
        if 'optimizer' not in checkpoint:
            return checkpoint  # a plain load (load_from), not a resume
        name = f'--resume {resume_from or filename!r}'
        saved = _saved_groups(checkpoint['optimizer'])
        ours = _run_groups(runner.optim_wrapper)
        sizes = [[len(g['params']) for g in groups]
                 for groups in (saved, ours)]
        if sizes[0] != sizes[1]:
            (n_saved, p_saved), (n_ours, p_ours) = [(len(n), sum(n))
                                                    for n in sizes]
            raise UsageError(
                f'{name}: its optimizer state has {n_saved} parameter '
                f'groups ({p_saved} parameters), this run\'s optimizer '
                f'{n_ours} ({p_ours}): the trainable parameters or their '
                f'grouping changed (frozen_stages, paramwise_cfg, the '
                f'architecture). Resume with the config the checkpoint was '
                f'trained with, or {_NEW_RUN}')
        for note in _resume_notes(runner, checkpoint, saved, ours):
            print_log(
                f'{name}: {note}', logger='current', level=logging.WARNING)
        return checkpoint

    runner.load_checkpoint = load_checkpoint


def _resume_notes(runner: 'Runner', checkpoint: dict, saved: List[dict],
                  ours: List[dict]) -> List[str]:
    """What a resume restores that differs from the run's config."""
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
    notes = []
    loop, meta = runner.train_loop, checkpoint.get('meta') or {}
    if isinstance(loop, (EpochBasedTrainLoop, IterBasedTrainLoop)):
        unit, key = _loop_unit(type(loop))
        done = meta.get('epoch' if unit == 'epoch' else 'iter')
        total = getattr(loop, key)
        if done is not None and done >= total:
            notes.append(f'the checkpoint is at {unit} {done} and the run '
                         f'ends at {total}: nothing is left to train (raise '
                         f'train_cfg.{key} to train on)')
    lrs = [[g.get('initial_lr') for g in groups] for groups in (saved, ours)]
    changed = [
        i for i, (a, b) in enumerate(zip(*lrs))
        if None not in (a, b) and a != b
    ]
    if changed:
        i = changed[0]
        notes.append(
            f'this run starts parameter group {i} at a learning rate of '
            f'{lrs[1][i]:g} (the config\'s, scaled by --auto-scale-lr if '
            f'given), the checkpoint\'s run at {lrs[0][i]:g}: MMEngine '
            f'restores the checkpoint\'s learning rates, so this run keeps '
            f'its schedule. To train at the new rate, {_NEW_RUN}')
    schedulers, states = runner.param_schedulers, checkpoint.get(
        'param_schedulers')
    if isinstance(schedulers, list) and isinstance(states, list):
        for i, (scheduler, state) in enumerate(zip(schedulers, states)):
            if state.get('end') in (None, scheduler.end):
                continue
            # Both in the scheduler's steps: iterations once converted.
            unit = 'epoch' if scheduler.by_epoch else 'iteration'
            notes.append(
                f'param_scheduler[{i}] ({type(scheduler).__name__}) ends at '
                f'{unit} {scheduler.end} in this run and at {unit} '
                f'{state["end"]} in the checkpoint: MMEngine restores the '
                f'checkpoint\'s schedulers, so the learning rate follows the '
                f'old schedule. To train with the new one, {_NEW_RUN}')
    return notes


def scale_lr_with_accumulation(runner: 'Runner', cfg: Config) -> None:
    """Make ``--auto-scale-lr`` count gradient accumulation: MMEngine's
    ``Runner.scale_lr`` scales by ``world_size x batch_size /
    base_batch_size``, but each optimizer step of a run with
    ``optim_wrapper.accumulative_counts=N`` sums N batches. It is given
    ``base_batch_size / N`` instead, which gives the ratio of the images
    of one step to the base.

    Args:
        runner (Runner): The runner, before ``train()``.
        cfg (Config): Its config.
    """
    steps = accumulation_steps(cfg)
    if steps == 1:
        return
    scale_lr = runner.scale_lr

    @functools.wraps(scale_lr)
    def scale_counting_steps(optim_wrapper: Any,
                             auto_scale_lr: Optional[dict] = None) -> None:
        if auto_scale_lr and auto_scale_lr.get('enable'):
            base = auto_scale_lr['base_batch_size']
            print_log(
                f'optim_wrapper.accumulative_counts={steps}: each optimizer '
                f'step sums {steps} batches, which MMEngine\'s scaling of the '
                f'learning rate does not count; it is given '
                f'base_batch_size={base}/{steps}={base / steps:g}, so that '
                f'the ratio below is that of the images of one step to '
                f'{base}',
                logger='current')
            auto_scale_lr = dict(auto_scale_lr, base_batch_size=base / steps)
        return scale_lr(optim_wrapper, auto_scale_lr)

    runner.scale_lr = scale_counting_steps


@tool_main
def main(argv: Optional[List[str]] = None) -> None:
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
