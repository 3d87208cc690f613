# Copyright (c) boat-mm contributors. All rights reserved.
from .checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals
from .config import (adapt_cfg_to_device, add_cfg_options_arg,
                     check_data_roots, init_cpu_dist)

__all__ = [
    'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals',
    'check_data_roots', 'adapt_cfg_to_device', 'init_cpu_dist',
    'add_cfg_options_arg'
]
