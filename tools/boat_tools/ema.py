# Copyright (c) boat-mm contributors. All rights reserved.
"""mmpretrain's ``EMAHook`` for test-time augmentation.

The hook averages a copy of the tested model. Under ``--tta`` that model
is a TTA wrapper around the classifier, so the copy holds the classifier
one level deeper (``module.module.``) than the ``ema_state_dict`` of a
checkpoint written in training (``module.``): mmpretrain's hook loads
none of the averaged weights into it (boat-mm's backbones refuse such a
load; upstream ones keep the weights they started with, and the test
then scores those). :class:`TTAEMAHook` loads them into the classifier
inside the wrapper. ``tools/test.py --tta`` uses it in place of the
config's ``EMAHook``; importing this module registers it in
mmpretrain's ``HOOKS``.
"""
from collections import OrderedDict
from typing import Union

from mmengine.runner import Runner
from mmengine.runner.checkpoint import load_state_dict
from mmpretrain.engine.hooks import EMAHook
from mmpretrain.registry import HOOKS

__all__ = ['TTAEMAHook', 'is_ema_hook']


def is_ema_hook(hook_type: Union[str, type, None]) -> bool:
    """Whether a hook config's ``type`` (a registered name, maybe scoped,
    or a class) is mmpretrain's ``EMAHook`` itself (not a subclass, whose
    own behaviour :class:`TTAEMAHook` would drop).

    Args:
        hook_type (str | type | None): The ``type`` of the config.

    Returns:
        bool: True for ``EMAHook`` itself.
    """
    if isinstance(hook_type, str):
        hook_type = HOOKS.get(hook_type)
    return hook_type is EMAHook


# force: tools/test.py may be loaded more than once in a process (tests).
@HOOKS.register_module(force=True)
class TTAEMAHook(EMAHook):
    """mmpretrain's ``EMAHook`` for a model under a TTA wrapper."""

    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        """Load the checkpoint's averaged weights into the classifier
        inside the TTA wrapper of the averaged copy (after swapping them
        back, as mmpretrain's hook does).

        Args:
            runner (Runner): The runner testing the checkpoint.
            checkpoint (dict): The loaded checkpoint.
        """
        if 'ema_state_dict' not in checkpoint:
            # mmpretrain's hook loads `state_dict` through MMEngine's
            # loader, which looks inside TTA wrappers.
            super().after_load_checkpoint(runner, checkpoint)
            return
        self._swap_ema_state_dict(checkpoint)
        state = checkpoint['ema_state_dict']
        prefix = 'module.'
        weights = OrderedDict((k[len(prefix):], v) for k, v in state.items()
                              if k.startswith(prefix))
        # MMEngine's loader goes into the TTA wrapper (ema_model.module).
        load_state_dict(
            self.ema_model.module, weights, strict=self.strict_load)
        if 'steps' in state:
            self.ema_model.steps.copy_(state['steps'])
        self.load_ema_from_ckpt = True
