# Copyright (c) boat-mm contributors. All rights reserved.
from .backbones import *  # noqa: F401,F403
from .selfsup import *  # noqa: F401,F403
from .utils import *  # noqa: F401,F403
