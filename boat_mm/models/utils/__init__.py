# Copyright (c) boat-mm contributors. All rights reserved.
from .fsla import FeatureSpaceLocalAttention

__all__ = ['FeatureSpaceLocalAttention']
