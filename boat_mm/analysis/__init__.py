# Copyright (c) boat-mm contributors. All rights reserved.
"""Analysis of trained BOAT models (not imported by ``import boat_mm``)."""
from .attention_recall import (MEASURES, FSLARecord, TooManyTokensError,
                               attention_recall, block_recall, capture_fsla,
                               fsla_keys, global_attention, random_slots,
                               stripe_window_labels, swin_window_labels,
                               window_keys, window_labels)

__all__ = [
    'MEASURES', 'FSLARecord', 'TooManyTokensError', 'capture_fsla',
    'fsla_keys', 'random_slots', 'window_keys', 'window_labels',
    'swin_window_labels', 'stripe_window_labels', 'attention_recall',
    'global_attention', 'block_recall'
]
