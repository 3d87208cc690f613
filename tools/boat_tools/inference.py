# Copyright (c) boat-mm contributors. All rights reserved.
"""What the tools that run a model on image files share
(``tools/visualization/vis_clusters.py``,
``tools/analysis_tools/attention_recall.py``, ``tools/image_demo.py``):
the config's task by its ``default_scope`` (mmpretrain, mmseg or mmdet),
its model built with a checkpoint, and its test pipeline for one image.
"""
from copy import deepcopy
from typing import Optional, Sequence

import torch.nn as nn
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.logging import print_log
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint

from .cli import (SCOPE_LIBRARIES, UsageError, check_checkpoint, check_device,
                  no_test_set)

__all__ = [
    'SCOPES', 'config_scope', 'build_model', 'build_pipeline', 'token_stride'
]

# The scopes of the task libraries the tools know.
SCOPES = tuple(SCOPE_LIBRARIES)


def config_scope(cfg: Config, tool: str = 'This tool') -> str:
    """The config's ``default_scope``, one of :data:`SCOPES`.

    Args:
        cfg (Config): The config.
        tool (str): Name used in the error message.

    Returns:
        str: ``'mmpretrain'``, ``'mmseg'`` or ``'mmdet'``.

    Raises:
        UsageError: Any other scope, or none.
    """
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise UsageError(
            f'The config\'s default_scope is {scope!r}; {tool} needs an '
            f'mmpretrain (classification), mmseg (segmentation) or mmdet '
            f'(detection) config, with default_scope in {SCOPES}.')
    return scope


def build_model(cfg: Config,
                checkpoint: Optional[str] = None,
                device: str = 'cpu',
                tool: str = 'This tool') -> nn.Module:
    """Build the config's model in its scope and load ``checkpoint``.

    Args:
        cfg (Config): An mmpretrain, mmseg or mmdet config.
        checkpoint (str, optional): Weights; None keeps the random
            initialisation (and says so).
        device (str): Device of the model. Defaults to ``'cpu'``.
        tool (str): Name used in the error messages.

    Returns:
        nn.Module: The model in eval mode.
    """
    check_device(device)
    init_default_scope(config_scope(cfg, tool))
    model_cfg = deepcopy(cfg.model)
    # mmpretrain configs keep it at the top level; the runner merges it.
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(model_cfg)
    if checkpoint is None:
        print_log(
            'No --checkpoint: the results are those of randomly '
            'initialised weights.',
            logger='current')
    else:
        load_checkpoint(
            model, check_checkpoint(checkpoint), map_location='cpu')
    return model.to(device).eval()


def build_pipeline(cfg: Config,
                   shape: Optional[Sequence[int]] = None,
                   tool: str = 'This tool') -> Compose:
    """The config's test pipeline for one image file, without annotations.

    Args:
        cfg (Config): An mmpretrain, mmseg or mmdet config.
        shape (Sequence[int], optional): ``(H, W)`` (a tool's
            ``--shape``): only the pipeline's loading and packing
            transforms are kept, around a plain resize to ``H x W``.
            Defaults to None.
        tool (str): Name used in the error messages.

    Returns:
        Compose: The pipeline.
    """
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    pipeline = dataset.get('pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        raise no_test_set(
            cfg, 'neither test_dataloader.dataset.pipeline nor test_pipeline',
            f'{tool} loads and packs the image with')
    # The transforms are those of the config's scope, as in build_model.
    init_default_scope(config_scope(cfg, tool))
    pipeline = [
        deepcopy(t) for t in pipeline if 'LoadAnnotations' not in t['type']
    ]
    if shape is not None:
        h, w = shape
        pipeline = [
            pipeline[0],
            dict(type='Resize', scale=(w, h), keep_ratio=False), pipeline[-1]
        ]
    return Compose(pipeline)


def token_stride(backbone: nn.Module, stage: int) -> Optional[int]:
    """Pixels per token of a stage: stem stride, doubled at each stage.

    Args:
        backbone (nn.Module): A backbone with ``patch_embed.projection``.
        stage (int): Index of the stage.

    Returns:
        int | None: The stride; None without such a stem.
    """
    proj = getattr(getattr(backbone, 'patch_embed', None), 'projection', None)
    stride = getattr(proj, 'stride', None)
    return int(stride[0]) * 2**stage if stride else None
