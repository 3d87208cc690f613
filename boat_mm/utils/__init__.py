# Copyright (c) boat-mm contributors. All rights reserved.
from .checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals
from .config import (adapt_cfg_to_device, add_cfg_options_arg, build_runner,
                     check_data_roots, init_cpu_dist, merge_common_args)

__all__ = [
    'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals',
    'check_data_roots', 'adapt_cfg_to_device', 'init_cpu_dist',
    'add_cfg_options_arg', 'merge_common_args', 'build_runner'
]
