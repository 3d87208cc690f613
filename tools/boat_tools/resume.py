# Copyright (c) boat-mm contributors. All rights reserved.
"""Check what ``tools/train.py --resume`` resumes, before and while the
runner loads it.

MMEngine's ``Runner.resume`` restores the weights, the optimizer, the
schedulers and the loop's count from a checkpoint; a checkpoint that does
not fit the run fails late and without naming the fix, or resumes into a
run that does otherwise than its config says. What is checked here, and
why:

* the file (:func:`check_resumable`): weights without the training state
  (a converted or bare state dict; :func:`missing_training_state`) load,
  then fail with ``KeyError: 'epoch'``;
* the optimizer (:func:`check_resume`): a state of other parameter groups
  than the run's optimizer fails in torch (``loaded state dict has a
  different number of parameter groups``);
* what the resume restores over the config (:func:`check_resume`,
  warnings): a finished run, another learning rate, another end of a
  scheduler.
"""
import functools
import logging
import os.path as osp
import pickle
from typing import TYPE_CHECKING, Any, List, Optional

from mmengine.logging import print_log

from .cli import UsageError, check_checkpoint
from .schedule import loop_unit

if TYPE_CHECKING:
    from mmengine.runner import Runner

__all__ = ['missing_training_state', 'check_resumable', 'check_resume']


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
        unit, key = loop_unit(type(loop))
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
