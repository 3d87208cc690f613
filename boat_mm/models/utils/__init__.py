# Copyright (c) boat-mm contributors. All rights reserved.
from .cswin_attn import CSWinAttention, LePEStripeAttention
from .drop import BOATDropPath
from .fsla import FeatureSpaceLocalAttention
from .window_attn import BOATShiftWindowMSA, WindowMSA

__all__ = [
    'FeatureSpaceLocalAttention', 'CSWinAttention', 'LePEStripeAttention',
    'BOATDropPath', 'BOATShiftWindowMSA', 'WindowMSA'
]
