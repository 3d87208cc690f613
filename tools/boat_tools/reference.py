# Copyright (c) boat-mm contributors. All rights reserved.
"""Running the public BOAT implementation next to ours (parity checks,
benchmarks, checkpoint verification); never used by the models.

The public code (github.com/mahaoyuHKU/pytorch-boat) is not a package: its
model files are imported from a checkout by path, and they call
``Tensor.cuda()`` unconditionally, which :func:`cuda_calls_stay_put`
neutralises so they run on the CPU.
"""
import contextlib
import importlib.util
import os.path as osp
import sys
import warnings
from types import ModuleType
from typing import Iterator

import torch

from boat_mm.models.backbones import boat_families

__all__ = ['import_public_module', 'cuda_calls_stay_put']


def import_public_module(ref_repo: str, family: str) -> ModuleType:
    """Import the model module of ``family`` from a public checkout.

    Args:
        ref_repo (str): Root of a pytorch-boat checkout (e.g. extracted with
            ``git archive HEAD | tar -x -C DIR``).
        family (str): A registered family's ``family`` name (``'swin'``,
            ``'cswin'``); its ``published_code`` names the model file.

    Returns:
        ModuleType: The module (imported once, then cached).
    """
    codes = {f.family: f.published_code for f in boat_families()}
    if family not in codes:
        raise KeyError(f'unknown BOAT family {family!r}; registered: '
                       f'{sorted(codes)}')
    folder, rel = codes[family]
    path = osp.join(ref_repo, folder, rel)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'{path} not found: --ref-repo must be the root of a '
            f'mahaoyuHKU/pytorch-boat checkout (folders BOAT-Swin/ and '
            f'BOAT-CSWin/).')
    name = f'boat_reference_{family}'
    if name in sys.modules:
        return sys.modules[name]
    # Its own imports (e.g. sibling modules) resolve from its folder.
    family_dir = osp.join(ref_repo, folder)
    if family_dir not in sys.path:
        sys.path.insert(0, family_dir)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered first: timm's @register_model looks the module up.
    sys.modules[name] = module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            spec.loader.exec_module(module)
    except ImportError as err:
        del sys.modules[name]
        raise ImportError(
            f'cannot import {path}: {err}. The public code needs timm and '
            f'einops: pip install timm einops') from err
    return module


@contextlib.contextmanager
def cuda_calls_stay_put(device: torch.device = torch.device('cpu')
                        ) -> Iterator[None]:
    """Make ``Tensor.cuda()`` return the tensor itself unless ``device`` is
    a CUDA device, so the public code runs where its inputs are."""
    original = torch.Tensor.cuda
    if torch.device(device).type != 'cuda':
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
