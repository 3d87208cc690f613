# Copyright (c) boat-mm contributors. All rights reserved.
from .clusters import (capture_cluster_ids, cluster_palette, colorize_ids,
                       draw_clusters, find_fsla_modules, get_boat_backbone,
                       upsample_ids)

__all__ = [
    'capture_cluster_ids', 'cluster_palette', 'colorize_ids', 'draw_clusters',
    'find_fsla_modules', 'get_boat_backbone', 'upsample_ids'
]
