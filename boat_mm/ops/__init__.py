# Copyright (c) boat-mm contributors. All rights reserved.
"""Operations of feature-space local attention (FSLA).

The clustering and the clustered attention are ``torch.ops.boat_mm`` ops
defined once (:mod:`._library`: schemas, fake kernels, autograd) with
implementations per backend, chosen by ``impl`` in one place
(:mod:`._backends`): tensor ops for any device, C++ CPU kernels
(``boat_mm._C``) and Triton kernels for CUDA (:mod:`.triton`).
"""
from ._backends import IMPLS, check_impl
from .clustered_attn import (clustered_attention, inverse_slots,
                             perm_covers_tokens, permute_rows)
from .clustering import (ClusterPlan, balanced_hierarchical_clustering,
                         build_cluster_plan, cluster_ids_from_perm,
                         cpu_kernel_available, num_clusters_for)

__all__ = [
    'ClusterPlan', 'build_cluster_plan', 'balanced_hierarchical_clustering',
    'cluster_ids_from_perm', 'num_clusters_for', 'clustered_attention',
    'inverse_slots', 'perm_covers_tokens', 'permute_rows',
    'cpu_kernel_available', 'check_impl', 'IMPLS'
]
