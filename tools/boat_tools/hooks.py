# Copyright (c) boat-mm contributors. All rights reserved.
"""Check the hooks of a training run against what the run gives them
(``tools/train.py``).

* :func:`check_save_best`, before the runner is built: a
  ``default_hooks.checkpoint.save_best`` that names a metric validation
  does not report stops the run at its first validation (MMEngine's
  ``CheckpointHook`` raises ``KeyError``), hours into it. The names are
  asked of the config's metrics themselves, on one synthetic batch
  (:func:`evaluator_keys`).
* :func:`ema_start_note`, once the runner is built: an ``EMAHook`` whose
  momentum is for a far longer run (an ImageNet recipe's, in a short
  fine-tuning) leaves its average, which validation, the checkpoints and
  ``test.py`` use, mostly at the weights the run started from; MMEngine
  says nothing.

Kept apart from :mod:`.ema` (the test tool's hook), which imports
mmpretrain: these checks serve the configs of every scope.
"""
import logging
from copy import deepcopy
from typing import TYPE_CHECKING, Any, List, Optional

from mmengine.config import Config

from .cli import UsageError
from .config import evaluator_metrics

if TYPE_CHECKING:
    from mmengine.runner import Runner

__all__ = [
    'check_save_best', 'evaluator_keys', 'ema_start_note', 'EMA_KEPT_MAX',
    'EMA_KEPT_FIX'
]


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


def evaluator_keys(cfg: Config) -> Optional[List[str]]:
    """The keys of what ``val_evaluator`` reports, asked of its metrics on
    one synthetic batch; None unless every metric is one that can be
    asked (see :func:`_synthetic_results`)."""
    from mmengine.logging import MMLogger
    from mmengine.registry import METRICS, init_default_scope
    metrics = [m for _, m in evaluator_metrics(cfg, 'val_evaluator')]
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
    (:func:`evaluator_keys`).

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
    keys = evaluator_keys(cfg)
    unknown = [k for k in wanted if keys is not None and k not in keys]
    if unknown:
        raise UsageError(
            f'default_hooks.checkpoint.save_best={best!r}: validation '
            f'reports {", ".join(keys)}, not {", ".join(unknown)}, and '
            f'MMEngine\'s CheckpointHook would stop the run at its first '
            f'validation: name one of those, or \'auto\' (the first)')


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
