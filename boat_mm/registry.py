# Copyright (c) boat-mm contributors. All rights reserved.
"""Registries used by boat_mm.

boat_mm registers its modules in MMEngine's *root* ``MODELS`` registry.
Every OpenMMLab 2.x library (mmseg, mmpretrain, mmdet, ...) creates its own
``MODELS`` as a child of that root, and a child registry falls back to its
parents when a name is not found locally. So one ``type='BOATCSWin'`` builds
under ``default_scope='mmseg'`` and ``default_scope='mmpretrain'`` alike,
without boat_mm depending on either library at import time.
"""
from mmengine.registry import MODELS

__all__ = ['MODELS']
