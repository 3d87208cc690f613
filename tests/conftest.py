# Copyright (c) boat-mm contributors. All rights reserved.
import os.path as osp

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='session')
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope='session')
def ade_root(tmp_path_factory) -> str:
    """A tiny generated ADE20K-like dataset shared by the tests."""
    from boat_mm.datasets import generate_ade20k_like
    out = tmp_path_factory.mktemp('ade')
    return generate_ade20k_like(
        str(out), num_train=8, num_val=4, img_size=64, seed=0,
        progress=False)


@pytest.fixture(scope='session')
def imagenet_root(tmp_path_factory) -> str:
    """A tiny generated ImageNet-like dataset shared by the tests."""
    from boat_mm.datasets import generate_imagenet_like
    out = tmp_path_factory.mktemp('imagenet')
    generate_imagenet_like(
        str(out), num_train=3, num_val=2, img_size=32, seed=0,
        progress=False)
    return str(out)
