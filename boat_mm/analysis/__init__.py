# Copyright (c) boat-mm contributors. All rights reserved.
"""Analysis of trained BOAT models (not imported by ``import boat_mm``).

FLOP counting is :mod:`boat_mm.analysis.complexity`, imported on its own
(it registers a custom op and loads ``mmengine.analysis``).
"""
from .attention_recall import (MEASURES, attention_recall, block_recall,
                               fsla_keys, global_attention, random_slots,
                               stripe_window_labels, swin_window_labels,
                               window_keys, window_labels)
from .capture import (FSLARecord, TooManyTokensError, capture_fsla,
                      check_locations, find_fsla_modules, fsla_input_hooks,
                      get_boat_backbone)

__all__ = [
    'MEASURES', 'FSLARecord', 'TooManyTokensError', 'capture_fsla',
    'fsla_input_hooks', 'get_boat_backbone', 'find_fsla_modules',
    'check_locations', 'fsla_keys', 'random_slots', 'window_keys',
    'window_labels', 'swin_window_labels', 'stripe_window_labels',
    'attention_recall', 'global_attention', 'block_recall'
]
