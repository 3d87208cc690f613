# Copyright (c) boat-mm contributors. All rights reserved.
from .boat_cswin import BOATCSWin
from .boat_swin import BOATSwin

__all__ = ['BOATCSWin', 'BOATSwin']
