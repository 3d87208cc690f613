# Copyright (c) boat-mm contributors. All rights reserved.
"""Check a config's training schedule against its training loop, before
the runner is built (``tools/train.py``).

MMEngine runs much of a schedule that does not fit its loop without a
word, or fails far into the run with an error that does not name the
config. What is checked here, and why:

* the loop (:func:`check_train_loop`): a ``train_cfg`` key the loop does
  not take (a ``TypeError`` of its ``__init__`` otherwise);
* the schedulers (:func:`check_param_scheduler`): one that ends before it
  begins (MMEngine refuses ``end <= begin`` when it builds it);
* the units (:func:`check_loop_units`): schedulers and a checkpoint hook
  by epoch in an iteration loop, an infinite sampler in an epoch loop
  (they never step, save or end);
* the validation interval (:func:`check_val_interval`): below 1 (a
  ``ZeroDivisionError``, or no validation);
* layer decay (:func:`check_layer_decay`): a rate no constructor reads;
* the schedule's length (:func:`schedule_length_note`, a warning):
  schedulers that end before or after the loop;
* the total batch (:func:`total_batch_note`, a warning) and gradient
  accumulation, which ``--auto-scale-lr`` counts
  (:func:`scale_lr_with_accumulation`).

The checks raise a :class:`~boat_tools.cli.UsageError` that names the fix;
the notes return the warning (or None) for the tool to print.
"""
import functools
import inspect
from typing import TYPE_CHECKING, Any, Optional, Tuple

from mmengine.config import Config
from mmengine.logging import print_log

from .cli import UsageError

if TYPE_CHECKING:
    from mmengine.runner import Runner

__all__ = [
    'check_train_loop', 'check_param_scheduler', 'check_loop_units',
    'check_val_interval', 'check_layer_decay', 'schedule_length_note',
    'accumulation_steps', 'total_batch_note', 'scale_lr_with_accumulation',
    'loop_unit'
]

#: What a short run is told to do about the recipe's scheduler.
_SHORT_RUN_FIX = ('give a child config its own param_scheduler, as "Shorter '
                  'ImageNet runs" in configs/boat_swin/README.md and '
                  'configs/boat_cswin/README.md shows')


def _train_loop(cfg: Config) -> Tuple[Optional[type], Any]:
    """MMEngine's epoch or iteration loop that ``train_cfg`` builds
    (``type``, or ``by_epoch`` as the runner reads it), None for another
    loop or no ``train_cfg``; and ``train_cfg``."""
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
    train_cfg = cfg.get('train_cfg')
    if not isinstance(train_cfg, dict):
        return None, train_cfg
    loops = {
        'EpochBasedTrainLoop': EpochBasedTrainLoop,
        'IterBasedTrainLoop': IterBasedTrainLoop
    }
    if 'type' in train_cfg:
        return loops.get(train_cfg['type']), train_cfg
    if 'by_epoch' not in train_cfg:
        return None, train_cfg
    epochs = train_cfg['by_epoch']
    return (EpochBasedTrainLoop if epochs else IterBasedTrainLoop), train_cfg


def loop_unit(loop: type) -> Tuple[str, str]:
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
    loop, train_cfg = _train_loop(cfg)
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
    unit, key = loop_unit(loop)
    other, other_key = (('iteration', 'max_iters') if unit == 'epoch' else
                        ('epoch', 'max_epochs'))
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
    schedulers = _scheduler_list(cfg)
    loop, train_cfg = _train_loop(cfg)
    if loop is None or schedulers is None:
        return  # another loop, or one scheduler list per optimizer
    unit, key = loop_unit(loop)
    epochs = unit == 'epoch'
    length = train_cfg.get(key)
    for i, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, dict):
            continue
        by_epoch = scheduler.get('by_epoch', True)
        begin = scheduler.get('begin', 0)
        end = scheduler.get('end')
        default = None
        if end is None and by_epoch == epochs and length is not None:
            # The runner's default (that of the other unit needs the data).
            default = f'train_cfg.{key}'
            end = length
        if end is None or end > begin:
            continue
        its_unit = 'epoch' if by_epoch else 'iteration'
        ends = (f'ends at {default}={end}' if default else f'ends at {end}')
        raise UsageError(
            f'param_scheduler[{i}] ({scheduler.get("type")}) begins at '
            f'{its_unit} {begin} and {ends}, and MMEngine needs end > '
            f'begin: for a run this short, {_SHORT_RUN_FIX}')


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
    loop, _ = _train_loop(cfg)
    if loop is None:
        return
    problems = []
    if loop_unit(loop)[0] == 'epoch':
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
    loop, train_cfg = _train_loop(cfg)
    if loop is None or cfg.get('val_cfg') is None:
        return
    interval = train_cfg.get('val_interval', 1)
    if isinstance(interval, (int, float)) and interval >= 1:
        return
    raise UsageError(
        f'train_cfg.val_interval={interval!r}: MMEngine validates every '
        f'val_interval {loop_unit(loop)[0]}s, which must be 1 or more; to '
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
    loop, train_cfg = _train_loop(cfg)
    schedulers = _scheduler_list(cfg)
    if loop is None or not schedulers:
        return None
    unit, key = loop_unit(loop)
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


def accumulation_steps(cfg: Config) -> int:
    """``optim_wrapper.accumulative_counts`` of a config: the loader
    batches each optimizer step sums (1 without accumulation, or with one
    optimizer wrapper per model part).

    Args:
        cfg (Config): The complete config.
    """
    wrapper = cfg.get('optim_wrapper')
    steps = wrapper.get('accumulative_counts', 1) if isinstance(wrapper,
                                                                dict) else 1
    return steps if isinstance(steps, int) and steps > 0 else 1


def total_batch_note(cfg: Config, world_size: int) -> Optional[str]:
    """A warning when a run's total batch is not the one the config's
    learning rate is for and ``--auto-scale-lr`` is off: MMEngine says
    nothing, and a 16-GPU recipe on 8 GPUs silently trains with half the
    batch at the full learning rate. Gradient accumulation counts: each
    optimizer step sees ``world_size x batch_size x accumulative_counts``
    images.

    Args:
        cfg (Config): The complete config.
        world_size (int): Processes of the run.

    Returns:
        str | None: The warning; None when the batches agree, the scaling
        is on or the config has no ``auto_scale_lr.base_batch_size``.
    """
    scale = cfg.get('auto_scale_lr') or {}
    loader = cfg.get('train_dataloader') or {}
    base, batch = scale.get('base_batch_size'), loader.get('batch_size')
    if scale.get('enable') or not base or not batch:
        return None
    steps = accumulation_steps(cfg)
    total = world_size * batch * steps
    if total == base:
        return None
    runs = f'{world_size} processes x {batch}' if world_size > 1 \
        else f'one process of {batch}'
    if steps > 1:
        runs += f' x {steps} accumulated (optim_wrapper.accumulative_counts)'
    fixes = []
    if base % (batch * steps) == 0:
        n = base // (batch * steps)
        fixes.append(f'run {n} processes (GPUS={n})')
    if base % (world_size * batch) == 0 and base // (world_size *
                                                     batch) != steps:
        fixes.append(f'accumulate {base // (world_size * batch)} batches '
                     f'(`--cfg-options optim_wrapper.accumulative_counts='
                     f'{base // (world_size * batch)}`)')
    return (f'The learning rate of this config is for a total batch of '
            f'{base} (auto_scale_lr.base_batch_size); this run\'s is '
            f'{runs} = {total}. Pass --auto-scale-lr to scale the learning '
            f'rate by {total}/{base}' + ''.join(f', or {fix}'
                                                for fix in fixes) + '.')


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
