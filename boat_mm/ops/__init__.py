# Copyright (c) boat-mm contributors. All rights reserved.
"""Operations of feature-space local attention (FSLA): tensor ops for any
device, plus a C++ CPU kernel for the clustering (``boat_mm._C``)."""
from .clustered_attn import clustered_attention, inverse_slots, permute_rows
from .clustering import (CLUSTERING_IMPLS, ClusterPlan,
                         balanced_hierarchical_clustering,
                         build_cluster_plan, cluster_ids_from_perm,
                         cpu_kernel_available, num_clusters_for)

__all__ = [
    'ClusterPlan', 'build_cluster_plan', 'balanced_hierarchical_clustering',
    'cluster_ids_from_perm', 'num_clusters_for', 'clustered_attention',
    'inverse_slots', 'permute_rows', 'cpu_kernel_available',
    'CLUSTERING_IMPLS'
]
