# Copyright (c) boat-mm contributors. All rights reserved.
"""Operations of feature-space local attention (FSLA): tensor ops for any
device, plus C++ CPU kernels for the clustering and the clustered attention
(``boat_mm._C``)."""
from .clustered_attn import clustered_attention, inverse_slots, permute_rows
from .clustering import (ClusterPlan, balanced_hierarchical_clustering,
                         build_cluster_plan, check_impl,
                         cluster_ids_from_perm, cpu_kernel_available,
                         num_clusters_for)

__all__ = [
    'ClusterPlan', 'build_cluster_plan', 'balanced_hierarchical_clustering',
    'cluster_ids_from_perm', 'num_clusters_for', 'clustered_attention',
    'inverse_slots', 'permute_rows', 'cpu_kernel_available', 'check_impl'
]
