# Copyright (c) boat-mm contributors. All rights reserved.
"""The models of ``configs/*/metafile.yml`` (OpenMMLab's metafile format):
the one home of their params, FLOPs and published numbers.

``model-index.yml`` lists the metafiles (``Import``), as in mmpretrain,
mmseg and mmdet. Both it and ``configs/`` are found in the source
checkout (``configs/`` next to ``boat_mm/``, also for ``pip install -e
.``), or, for a package installed from a wheel or an sdist, in
``boat_mm/.mim/``, where ``setup.py`` copies them (OpenMMLab's layout
for installed packages, which MIM reads).
"""
import os.path as osp
from typing import Dict, List, NamedTuple, Optional

import yaml

__all__ = [
    'REPO_ROOT', 'find_root', 'metafile_paths', 'read_metafiles', 'ModelInfo',
    'load_models', 'published_complexity'
]

_PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: The source checkout's root, if boat_mm runs from one.
CHECKOUT_ROOT = osp.dirname(_PACKAGE_DIR)
#: Where an installed package keeps its configs and model index.
MIM_ROOT = osp.join(_PACKAGE_DIR, '.mim')
INDEX_FILE = 'model-index.yml'


def find_root() -> str:
    """The folder that holds ``model-index.yml`` and ``configs/``.

    Returns:
        str: ``boat_mm/.mim`` of an installed package, else the source
        checkout's root; the checkout's root (where the files are missing)
        when neither holds them.
    """
    # .mim first: site-packages, the parent of an installed boat_mm, may
    # hold other packages' files but never ours.
    for root in (MIM_ROOT, CHECKOUT_ROOT):
        if osp.isfile(osp.join(root, INDEX_FILE)):
            return root
    return CHECKOUT_ROOT


#: The root that the metafiles' ``Config`` paths are relative to.
REPO_ROOT = find_root()


def metafile_paths(root: Optional[str] = None) -> List[str]:
    """The metafiles that ``root/model-index.yml`` imports.

    Args:
        root (str, optional): The folder holding ``model-index.yml``.
            Defaults to :func:`find_root`.

    Returns:
        list[str]: Their paths, relative to ``root``, in index order.

    Raises:
        FileNotFoundError: ``root`` has no ``model-index.yml``.
    """
    root = find_root() if root is None else root
    path = osp.join(root, INDEX_FILE)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'{path} not found: boat_mm is installed without its configs '
            f'and model index. Install it from a source checkout '
            f'(`pip install --no-build-isolation -e .`) or from a wheel or '
            f'sdist built by its setup.py, which puts them in '
            f'boat_mm/.mim/.')
    with open(path, encoding='utf-8') as f:
        return list(yaml.safe_load(f)['Import'])


def read_metafiles(root: Optional[str] = None) -> List[dict]:
    """The metafiles that ``root/model-index.yml`` imports, parsed: the one
    place that reads them (:func:`load_models`,
    :func:`boat_mm.model_index.mmpretrain_models`).

    Args:
        root (str, optional): The folder holding ``model-index.yml``.
            Defaults to :func:`find_root`.

    Returns:
        list[dict]: Each metafile's content, in index order.

    Raises:
        FileNotFoundError: ``root`` has no ``model-index.yml``, or lacks a
            metafile it imports.
    """
    root = find_root() if root is None else root
    metas = []
    for rel in metafile_paths(root):
        path = osp.join(root, rel)
        if not osp.isfile(path):
            raise FileNotFoundError(
                f'{path} not found: {root}/model-index.yml lists it; '
                f'reinstall boat_mm from a complete checkout.')
        with open(path, encoding='utf-8') as f:
            metas.append(yaml.safe_load(f))
    return metas


class ModelInfo(NamedTuple):
    """One entry of ``Models`` of a metafile.

    Attributes:
        name (str): ``Name``.
        config (str): ``Config``, relative to :data:`REPO_ROOT`.
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


def load_models(root: Optional[str] = None) -> List[ModelInfo]:
    """Every model of the metafiles of ``root/model-index.yml``, in index
    and file order.

    Args:
        root (str, optional): The folder holding ``model-index.yml``.
            Defaults to :func:`find_root`.

    Returns:
        list[ModelInfo]: The models.

    Raises:
        FileNotFoundError: ``root`` has no ``model-index.yml``, or lacks a
            metafile it imports.
    """
    models = []
    for meta in read_metafiles(root):
        for model in meta['Models']:
            source = model.get('Converted From', {})
            metrics = {
                key: value
                # (null for pre-training, as mmpretrain's SimMIM models)
                for result in model.get('Results') or []
                for key, value in result['Metrics'].items()
            }
            models.append(
                ModelInfo(model['Name'], model['Config'],
                          model['Metadata']['Parameters'],
                          model['Metadata']['FLOPs'], metrics,
                          source.get('Parameters'), source.get('FLOPs'),
                          source.get('Weights')))
    return models


def published_complexity(root: Optional[str] = None) -> Dict[str, ModelInfo]:
    """The models with published params and FLOPs (the ImageNet
    classifiers of converted weights), by config path.

    Args:
        root (str, optional): The folder holding ``model-index.yml``.
            Defaults to :func:`find_root`.

    Returns:
        dict[str, ModelInfo]: ``{config relative to root: model}``.
    """
    return {
        m.config: m
        for m in load_models(root) if m.published_flops is not None
    }
