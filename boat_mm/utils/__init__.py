# Copyright (c) boat-mm contributors. All rights reserved.
from .checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals

__all__ = ['allow_mmengine_checkpoints', 'mmengine_checkpoint_globals']
