# Copyright (c) boat-mm contributors. All rights reserved.
from .boat_cswin import BOATCSWin

__all__ = ['BOATCSWin']
