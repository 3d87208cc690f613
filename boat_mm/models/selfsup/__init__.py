# Copyright (c) boat-mm contributors. All rights reserved.
from .simmim import MaskedImageMixin, SimMIMBOATCSWin, SimMIMBOATSwin

__all__ = ['MaskedImageMixin', 'SimMIMBOATCSWin', 'SimMIMBOATSwin']
