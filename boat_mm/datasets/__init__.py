# Copyright (c) boat-mm contributors. All rights reserved.
from .synthetic import (class_appearance, generate_ade20k_like,
                        generate_imagenet_like, render_texture)
from .synthetic_coco import COCO_CATEGORIES, generate_coco_like

__all__ = [
    'generate_ade20k_like', 'generate_imagenet_like', 'class_appearance',
    'render_texture', 'generate_coco_like', 'COCO_CATEGORIES'
]
