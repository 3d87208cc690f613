# Copyright (c) boat-mm contributors. All rights reserved.
from .base_boat import (BaseBOATBackbone, CheckpointMismatchError,
                        boat_families, convert_boat_checkpoint,
                        detect_boat_family)
from .boat_cswin import BOATCSWin
from .boat_swin import BOATSwin

__all__ = [
    'BaseBOATBackbone', 'BOATCSWin', 'BOATSwin', 'CheckpointMismatchError',
    'boat_families', 'convert_boat_checkpoint', 'detect_boat_family'
]
