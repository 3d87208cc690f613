# Copyright (c) boat-mm contributors. All rights reserved.
"""Generated files laid out like the published BOAT-CSWin checkpoints.

timm's training script (which BOAT-CSWin's public code uses) saves
``state_dict``, ``state_dict_ema`` (under DataParallel, with ``module.``
prefixes), the epoch and the command line's ``argparse.Namespace`` as
``args``. The weights here are those of our BOAT-CSWin-T classifier laid
out by the inverse converter of ``tests/test_tools/test_converters.py``,
tensor ``i`` stored as the single number ``i`` (``i + 0.5`` in the EMA),
broadcast, so the file is small.
"""
import argparse
import importlib.util
import os.path as osp
from collections import OrderedDict
from typing import Dict, Tuple

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
NUM_CLASSES = 11


def _converters():
    path = osp.join(REPO, 'tests', 'test_tools', 'test_converters.py')
    spec = importlib.util.spec_from_file_location('_boat_converters', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SHAPES: Dict[str, torch.Size] = {}


def classifier_shapes() -> Dict[str, torch.Size]:
    """Key -> shape of our BOAT-CSWin-T classifier (NUM_CLASSES)."""
    if not _SHAPES:
        model = _converters().classifier(
            dict(type='BOATCSWin', arch='tiny'), NUM_CLASSES, 512)
        _SHAPES.update((k, v.shape) for k, v in model.state_dict().items())
    return dict(_SHAPES)


def write_published_cswin(path: str, **extra) -> Tuple[str, dict]:
    """Write a published-layout BOAT-CSWin-T file with ``args`` (an
    ``argparse.Namespace``) and ``extra`` top-level entries.

    Returns:
        tuple: ``path`` and the shapes of our classifier's state dict.
    """
    shapes = classifier_shapes()
    to_original = _converters().cswin_to_original

    def layout(offset: float) -> 'OrderedDict[str, torch.Tensor]':
        ours = OrderedDict((k, torch.tensor(i + offset).expand(shape))
                           for i, (k, shape) in enumerate(shapes.items()))
        return OrderedDict(
            ('module.' + k, v) for k, v in to_original(ours).items())

    args = argparse.Namespace(
        model='CSWin_64_12211_tiny_224', lr=2e-3, epochs=300, model_ema=True)
    torch.save(
        dict(
            epoch=299,
            arch='CSWin_64_12211_tiny_224',
            state_dict=layout(0.),
            state_dict_ema=layout(0.5),
            args=args,
            **extra), path)
    return path, shapes
