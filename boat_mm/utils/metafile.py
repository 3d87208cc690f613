# Copyright (c) boat-mm contributors. All rights reserved.
"""The models of ``configs/*/metafile.yml`` (OpenMMLab's metafile format):
the one home of their params, FLOPs and published numbers."""
import glob
import os.path as osp
from typing import Dict, List, NamedTuple, Optional

import yaml

__all__ = ['REPO_ROOT', 'ModelInfo', 'load_models', 'published_complexity']

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class ModelInfo(NamedTuple):
    """One entry of ``Models`` of a metafile.

    Attributes:
        name (str): ``Name``.
        config (str): ``Config``, relative to the repository root.
        params (int): ``Metadata.Parameters``: of the boat-mm model.
        flops (int): ``Metadata.FLOPs``: as the metafile's header says
            (``get_flops.py``'s multiply-adds, or for detectors its FLOPs
            line, which adds mmengine's norm estimates).
        metrics (dict): ``Results`` as ``{metric: value}``.
        published_params (int | None): ``Converted From.Parameters``: of
            the original model, as published.
        published_flops (int | None): ``Converted From.FLOPs``: likewise.
        published_weights (str | None): ``Converted From.Weights``: where
            the original weights are published.
    """
    name: str
    config: str
    params: int
    flops: int
    metrics: Dict[str, float]
    published_params: Optional[int]
    published_flops: Optional[int]
    published_weights: Optional[str]


def load_models(root: str = REPO_ROOT) -> List[ModelInfo]:
    """Every model of ``root/configs/*/metafile.yml``, in file order.

    Args:
        root (str): The repository root.

    Returns:
        list[ModelInfo]: The models.
    """
    models = []
    for path in sorted(
            glob.glob(osp.join(root, 'configs', '*', 'metafile.yml'))):
        with open(path) as f:
            meta = yaml.safe_load(f)
        for model in meta['Models']:
            source = model.get('Converted From', {})
            metrics = {
                key: value
                for result in model.get('Results', [])
                for key, value in result['Metrics'].items()
            }
            models.append(
                ModelInfo(model['Name'], model['Config'],
                          model['Metadata']['Parameters'],
                          model['Metadata']['FLOPs'], metrics,
                          source.get('Parameters'), source.get('FLOPs'),
                          source.get('Weights')))
    return models


def published_complexity(root: str = REPO_ROOT) -> Dict[str, ModelInfo]:
    """The models with published params and FLOPs (the ImageNet
    classifiers of converted weights), by config path.

    Args:
        root (str): The repository root.

    Returns:
        dict[str, ModelInfo]: ``{config relative to root: model}``.
    """
    return {
        m.config: m
        for m in load_models(root) if m.published_flops is not None
    }
