# Copyright (c) boat-mm contributors. All rights reserved.
"""Generated files laid out like the published BOAT-CSWin checkpoints.

timm's training script (which BOAT-CSWin's public code uses) saves
``state_dict``, ``state_dict_ema`` (under DataParallel, with ``module.``
prefixes), the epoch and the command line's ``argparse.Namespace`` as
``args``. The weights here are those of our BOAT-CSWin-T classifier laid
out by :func:`cswin_to_original`, the inverse of the converter (tested in
``tests/test_tools/test_converters.py``), tensor ``i`` stored as the
single number ``i`` (``i + 0.5`` in the EMA), broadcast, so the file is
small (or weights the caller passes). :func:`classifier` and
:func:`cswin_to_original` also serve the converter tests.
"""
import argparse
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

NUM_CLASSES = 11

# Our key -> published BOAT-CSWin key. A block of our stage s is a block
# of the original's stage s + 1; our stage s starts with merge{s}.
_CSWIN_BLOCK = [
    (r'norm1\.', 'norm1.'),
    (r'attn\.qkv\.', 'qkv.'),
    (r'attn\.proj\.', 'proj.'),
    (r'attn\.branches\.(\d)\.get_v\.', r'attns.\1.get_v.'),
    (r'norm_fsla\.', 'norm3.'),
    (r'fsla\.(qkv|proj|get_v)\.', r'content_attn.\1.'),
    (r'norm2\.', 'norm2.'),
    (r'ffn\.layers\.0\.0\.', 'mlp.fc1.'),
    (r'ffn\.layers\.1\.', 'mlp.fc2.'),
]


def cswin_key_to_original(key: str, last: int) -> str:
    """The published BOAT-CSWin name of our classifier's ``key``
    (``last``: the index of our last stage)."""
    simple = {
        'backbone.patch_embed.projection.': 'stage1_conv_embed.0.',
        'backbone.patch_embed.norm.': 'stage1_conv_embed.2.',
        f'backbone.norm{last}.': 'norm.',
        'head.fc.': 'head.',
    }
    for ours, orig in simple.items():
        if key.startswith(ours):
            return orig + key[len(ours):]
    m = re.match(
        r'backbone\.stages\.(\d+)\.downsample\.(projection|norm)\.'
        r'(weight|bias)$', key)
    if m:
        part = 'conv' if m[2] == 'projection' else 'norm'
        return f'merge{m[1]}.{part}.{m[3]}'
    m = re.match(r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.*)$', key)
    assert m, key
    stage, block, rest = int(m[1]), m[2], m[3]
    for pattern, repl in _CSWIN_BLOCK:
        new, n = re.subn('^' + pattern, repl, rest)
        if n:
            return f'stage{stage + 1}.{block}.{new}'
    raise AssertionError(f'no original name for {key}')


def cswin_to_original(ours: Dict[str, torch.Tensor],
                      last: int = 3) -> 'OrderedDict[str, torch.Tensor]':
    """Our classifier's state dict in the published BOAT-CSWin layout (the
    inverse of ``BOATCSWin.published.convert``)."""
    orig = OrderedDict()
    for key, value in ours.items():
        new = cswin_key_to_original(key, last)
        assert new not in orig, new
        orig[new] = value
    return orig


def classifier(backbone: dict, num_classes: int, in_channels: int):
    """Our mmpretrain classifier with ``backbone`` (a config dict)."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    import boat_mm  # noqa: F401  (registers the backbones)
    init_default_scope('mmpretrain')
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(out_indices=(3, ), **backbone),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=num_classes,
                in_channels=in_channels)))


_SHAPES: Dict[str, torch.Size] = {}


def classifier_shapes() -> Dict[str, torch.Size]:
    """Key -> shape of our BOAT-CSWin-T classifier (NUM_CLASSES)."""
    if not _SHAPES:
        model = classifier(
            dict(type='BOATCSWin', arch='tiny'), NUM_CLASSES, 512)
        _SHAPES.update((k, v.shape) for k, v in model.state_dict().items())
    return dict(_SHAPES)


def write_published_cswin(path: str,
                          weights: Optional[Dict[str, torch.Tensor]] = None,
                          **extra) -> Tuple[str, dict]:
    """Write a published-layout BOAT-CSWin-T file with ``args`` (an
    ``argparse.Namespace``) and ``extra`` top-level entries.

    Args:
        path (str): The file to write.
        weights (dict, optional): A state dict of our BOAT-CSWin-T
            classifier (:data:`NUM_CLASSES`) to lay out, as both
            ``state_dict`` and ``state_dict_ema`` (the same tensors: the
            file holds them once). Defaults to tensor ``i`` filled with
            ``i`` (``i + 0.5`` in the EMA).
        **extra: More top-level entries.

    Returns:
        tuple: ``path`` and the shapes of our classifier's state dict.
    """
    shapes = classifier_shapes()

    def layout(offset: float) -> 'OrderedDict[str, torch.Tensor]':
        ours = weights if weights is not None else OrderedDict(
            (k, torch.tensor(i + offset).expand(shape))
            for i, (k, shape) in enumerate(shapes.items()))
        return OrderedDict(
            ('module.' + k, v) for k, v in cswin_to_original(ours).items())

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
