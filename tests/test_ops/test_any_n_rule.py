# Copyright (c) boat-mm contributors. All rights reserved.
"""The any-N rule of FSLA's clustering (cluster count and sizes) against a
reference written from its documentation (boat_mm/ops/clustering.py), with
token counts on both sides of every limit of the rule.

The rule, in words: the clusters are the ``G = 2**L`` leaves of a complete
binary tree. ``L`` is the level whose cluster size ``N / 2**L`` is closest
to ``group_size`` on a log scale; if that size is above
``1.35 * group_size`` one level more is taken. A map of at most
``group_size`` tokens is one cluster. The leaves hold ``N // G`` real
tokens, the first ``N % G`` of them one more. Hence the mean cluster
size lies in ``(0.675, 1.35] * group_size`` unless ``G == 1``, when
``N <= 1.35 * group_size``.

Nothing here calls the rule's implementation to get the expected values:
the plan, the clustering op (both implementations) and the FSLA module
are compared with :func:`reference_sizes`.
"""
import math
from typing import List

import pytest
import torch

from boat_mm.ops import (_backends, balanced_hierarchical_clustering,
                         build_cluster_plan, cpu_kernel_available)

BOUND = 1.35


def reference_level(n: int, group_size: int) -> int:
    """``L`` of the documented rule, by trying every level."""
    if n <= group_size:
        return 0
    target = math.log2(group_size)
    level = min(range(64), key=lambda k: abs(math.log2(n) - k - target))
    if n / 2**level > BOUND * group_size:
        level += 1
    return level


def reference_sizes(n: int, group_size: int) -> List[int]:
    """Real tokens of every leaf cluster, left to right."""
    g = 2**reference_level(n, group_size)
    return [n // g + (c < n % g) for c in range(g)]


# Worked by hand from the rule (group size 49): the reference itself.
HAND = {
    1: [1],
    49: [49],
    50: [50],
    66: [66],  # 66 <= 1.35 * 49 = 66.15: still one cluster
    67: [34, 33],  # 67 > 66.15: two clusters
    69: [35, 34],  # just below 49 * sqrt(2) = 69.3 (the log midpoint)
    70: [35, 35],  # just above it
    98: [49, 49],
    132: [66, 66],  # 66 per cluster: at the bound
    133: [34, 33, 33, 33],  # 66.5 per cluster: over it
    196: [49] * 4,
    265: [34] + [33] * 7,  # 66.25 per cluster at 4: over the bound
}


@pytest.mark.parametrize('n', sorted(HAND))
def test_reference_matches_hand_worked_cases(n):
    assert reference_sizes(n, 49) == HAND[n]


# Token counts on both sides of every limit, for a few group sizes:
# N <= group_size, N around BOUND * group_size * 2**k (the size bound),
# around group_size * sqrt(2) * 2**k (log-scale rounding) and around
# group_size * 2**k, plus the published N = 49 * 2**L.
def limit_counts(group_size: int, max_level: int = 4) -> List[int]:
    counts = {1, 2, group_size - 1, group_size, group_size + 1} - {0}
    for k in range(max_level):
        for edge in (BOUND * group_size * 2**k,
                     math.sqrt(2) * group_size * 2**k, group_size * 2**k,
                     group_size * 2**k / math.sqrt(2)):
            base = int(math.floor(edge))
            counts.update(range(max(1, base - 1), base + 3))
    return sorted(counts)


@pytest.mark.parametrize('group_size', [49, 16, 10, 8, 1])
def test_plan_follows_the_rule(group_size):
    for n in sorted(set(limit_counts(group_size)) | set(range(1, 100))):
        plan = build_cluster_plan(n, group_size, 0)
        sizes = reference_sizes(n, group_size)
        assert plan.num_clusters == len(sizes), n
        assert plan.slot_size == max(sizes), n
        got = plan.slot_valid.view(len(sizes), -1).sum(1).tolist()
        assert got == sizes, n


def test_rule_bounds():
    for n in list(range(1, 3000)) + [529]:
        sizes = reference_sizes(n, 49)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        if len(sizes) == 1:
            assert n <= BOUND * 49
        else:
            # The mean size is bounded; single clusters may be one token
            # over (529 tokens: 8 clusters of 66.1 on average, one of 67).
            assert 0.675 * 49 < n / len(sizes) <= BOUND * 49


@pytest.fixture(params=['cpp', 'tensor'])
def impl(request, monkeypatch):
    """Both implementations of the op behind 'auto'."""
    if request.param == 'cpp' and not cpu_kernel_available():
        pytest.skip('boat_mm._C is not built (BOAT_MM_WITH_OPS=0)')
    if request.param == 'tensor':
        monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', False)
    return request.param


@pytest.mark.parametrize('n,group_size', [(66, 49), (67, 49), (69, 49),
                                          (70, 49), (132, 49), (133, 49),
                                          (264, 49), (265, 49), (21, 16),
                                          (22, 16), (43, 16), (44, 16)])
def test_clustering_output_has_the_rule_sizes(impl, n, group_size):
    """Cluster ``c`` of the op's output owns slots ``[c*S, (c+1)*S)``, its
    real tokens first: taking the reference count of each must give every
    token exactly once."""
    sizes = reference_sizes(n, group_size)
    plan = build_cluster_plan(n, group_size, 0)
    if len(sizes) == 1:
        return  # a single cluster is never clustered (see FSLA)
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(3, n, 8, generator=gen, dtype=torch.float64)
    perm = balanced_hierarchical_clustering(q, plan)
    S = max(sizes)
    assert perm.shape == (3, len(sizes) * S)
    for row in perm.tolist():
        real = [
            t for c, size in enumerate(sizes) for t in row[c * S:c * S + size]
        ]
        assert sorted(real) == list(range(n))


@pytest.mark.parametrize('hw', [(6, 11), (1, 67), (12, 11), (7, 19)])
def test_module_equals_reference_with_rule_sizes(impl, hw):
    """FSLA on both sides of the size bound (66 | 67, 132 | 133 tokens)
    equals the slow reference of test_fsla.py given the leaf sizes of
    this file's rule."""
    from test_fsla import make_module, reference_fsla, unambiguous
    n = hw[0] * hw[1]
    m = make_module(8, 2)
    sizes = reference_sizes(n, 49)

    def reference(x):
        with torch.no_grad():
            ref = reference_fsla(m, x, hw, 2, leaf_sizes=sizes)
        return ref.out, ref.margin

    x, (ref, _) = unambiguous(
        lambda g: torch.randn(2, n, 8, dtype=torch.float64, generator=g),
        reference)
    with torch.no_grad():
        ours = m(x, hw)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
