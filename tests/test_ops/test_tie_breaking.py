# Copyright (c) boat-mm contributors. All rights reserved.
"""Tie-breaking of the clustering at a chosen level, on every backend.

The rule (docs/fsla.md, section 1): at every level each node's real tokens
are sorted by increasing ratio ``r = (s0 + 1) / (s1 + 1)`` and equal
ratios keep their current order (a stable sort); the first ``n0`` go to
child 0, the rest to child 1, padding last.

A wrong tie rule can hide: two tokens that tie stay adjacent, and if they
are never separated, reversing them at two levels cancels out. So each
input here has exactly one pair of equal tokens, and the pair is cut,
one token to each child, at a chosen level ``l`` and nowhere else: its
order when it reaches the cut at level ``l`` (made by the tie rule of
levels ``0..l``) decides which child gets which. Every level of an odd
(3) and an even (4) number of levels is chosen once, uniform (no padding)
and padded. The expected permutation comes from :func:`reference`, the
rule written out node by node in float64 with Python's stable ``sorted``.

The two tokens of the pair are equal float64 vectors, so a backend gives
them bit-equal ratios wherever they share a node. Each input is checked to
be as intended (the pair cut at level ``l`` only, no two other ratios of a
node within 1e-9) and the reference is checked to depend on the tie rule
at level ``l``. The inputs of one shape, one per level, run as the rows of
one call. The values are float32 numbers, so that two shapes also run in
float32 (the packed-key and radix ranking paths), on inputs whose other
ratios lie 1e-4 apart.
"""
import math
import os
from typing import List, Optional, Set, Tuple

import pytest
import torch

from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         cpu_kernel_available)

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

ITERS, TEMPERATURE = 2, 100.
DIMS = 4


def _leaf_sizes(num_tokens: int, levels: int) -> List[int]:
    """Real tokens per leaf: ``N // G``, the first ``N % G`` one more."""
    G = 2**levels
    return [num_tokens // G + (c < num_tokens % G) for c in range(G)]


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp(min=1e-12)


def reference(
    x: torch.Tensor,
    levels: int,
    slot_size: int,
    reverse_ties_at: Optional[int] = None,
    zero_centroids: Optional[list] = None
) -> Tuple[List[int], Set[int], float, list]:
    """The clustering of one ``(N, d)`` float64 input, node by node.

    Args:
        x (Tensor): ``(N, d)`` float64 vectors.
        levels (int): ``L``.
        slot_size (int): ``S``; leaves are padded to it with token N - 1.
        reverse_ties_at (int, optional): Break ties at this level by
            *decreasing* position instead (a wrong rule, to check that an
            input depends on the rule there).
        zero_centroids (list, optional): Appended ``level`` for every
            centroid whose sum is exactly zero.

    Returns:
        tuple: The permutation (``2**L * S`` slots), the levels at which
        two tokens of equal ratio are cut apart, the smallest gap between
        unequal ratios inside a node, and per level and node the sorted
        tokens, ``n0`` and the sorted ratios.
    """
    N = x.shape[0]
    leaves = _leaf_sizes(N, levels)

    def centroid(v: torch.Tensor) -> torch.Tensor:
        if zero_centroids is not None and not bool(v.any()):
            zero_centroids.append(level)
        return _normalise(v)

    norms = x.norm(dim=1)
    unit = x / norms[:, None]
    nodes = [list(range(N))]  # token lists, in the node's current order
    cut_ties, min_gap, trace = set(), float('inf'), []
    for level in range(levels):
        trace.append([])
        span = 2**(levels - level - 1)  # leaves under each child
        children = []
        for j, tokens in enumerate(nodes):
            n0 = sum(leaves[2 * j * span:(2 * j + 1) * span])
            if not tokens:
                children += [[], []]
                trace[-1].append(([], n0, []))
                continue
            c = [
                centroid(x[tokens[:n0]].sum(0) / max(n0, 1)),
                centroid(x[tokens[n0:]].sum(0) / max(len(tokens) - n0, 1))
            ]
            for _ in range(ITERS):
                s = torch.stack([unit[tokens] @ c[0], unit[tokens] @ c[1]])
                # Soft assignments weight the raw (not unit) vectors.
                a = torch.softmax(TEMPERATURE * s, dim=0)
                c = [centroid(a[k] @ x[tokens]) for k in (0, 1)]
            s0, s1 = unit[tokens] @ c[0], unit[tokens] @ c[1]
            r = ((s0 + 1) / (s1 + 1)).tolist()
            sign = -1 if level == reverse_ties_at else 1
            # A 0/0 ratio (NaN) ranks after every other, as in torch.sort.
            order = sorted(
                range(len(tokens)),
                key=lambda i: (math.isnan(r[i]), 0.
                               if math.isnan(r[i]) else r[i], sign * i))
            ranked = [r[i] for i in order]
            for a_, b_ in zip(ranked, ranked[1:]):
                if a_ != b_:
                    min_gap = min(min_gap, b_ - a_)
            if 0 < n0 < len(tokens) and ranked[n0 - 1] == ranked[n0]:
                cut_ties.add(level)
            sorted_tokens = [tokens[i] for i in order]
            trace[-1].append((sorted_tokens, n0, [r[i] for i in order]))
            children += [sorted_tokens[:n0], sorted_tokens[n0:]]
        nodes = children
    perm = []
    for tokens in nodes:
        perm += tokens + [N - 1] * (slot_size - len(tokens))
    return perm, cut_ties, min_gap, trace


def _tokens(num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(num_tokens, DIMS, generator=gen, dtype=torch.float64)


def tie_input(num_tokens: int,
              levels: int,
              slot_size: int,
              level: int,
              min_gap: float = 1e-9) -> Tuple[torch.Tensor, List[int]]:
    """An input with one pair of equal tokens, cut apart at ``level`` only,
    and its reference permutation.

    Random tokens are drawn; the two tokens on both sides of a cut of
    ``level`` become equal (two halves of the first); the draw is kept if
    the pair is still cut there and nowhere else, and no other two ratios
    of a node lie within ``min_gap``. Values are float32 numbers (exact in
    float64), so the input also serves float32 tests.
    """
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        x = _tokens(num_tokens, gen).float().double()
        # The two tokens on both sides of a cut of `level` without ties.
        trace = reference(x, levels, slot_size)[3][level]
        j = int(torch.randint(0, len(trace), (1, ), generator=gen))
        tokens, n0, _ = trace[j]
        if not 0 < n0 < len(tokens):
            continue
        last0, first1 = tokens[n0 - 1], tokens[n0]
        # Two halves of the last token of child 0 weigh in the centroids
        # (sums of the raw vectors) as that token did, so the pair ranks
        # where it ranked, next to the cut.
        x[last0] /= 2
        x[first1] = x[last0]
        expected, cut_ties, gap, _ = reference(x, levels, slot_size)
        if cut_ties == {level} and gap > min_gap:
            # The input tests the rule at `level`: the reversed rule
            # there gives another permutation.
            flipped = reference(x, levels, slot_size, level)[0]
            assert flipped != expected
            return x, expected
    raise AssertionError(f'no input found for level {level} of {levels}')


IMPLS = ['tensor', 'cpp', pytest.param('triton', marks=pytest.mark.triton)]
# (N, group_size) -> L levels, S slots; uniform and padded.
SHAPES = {
    (24, 3): (3, 3),  # 8 leaves of 3
    (22, 3): (3, 3),  # 8 leaves of 3 or 2 (padded)
    (48, 3): (4, 3),  # 16 leaves of 3
    (45, 3): (4, 3),  # 16 leaves of 3 or 2 (padded)
}


def _run(impl: str, x: torch.Tensor, plan) -> torch.Tensor:
    if impl == 'cpp' and not cpu_kernel_available():
        pytest.skip('needs the C++ kernels (boat_mm._C)')
    if impl == 'triton':
        pytest.importorskip('triton')
        if not torch.cuda.is_available() and \
                os.environ.get('TRITON_INTERPRET') != '1':
            pytest.skip('Triton needs CUDA or TRITON_INTERPRET=1')
        if torch.cuda.is_available():
            x = x.cuda()
    return balanced_hierarchical_clustering(
        x, plan, kmeans_iters=ITERS, temperature=TEMPERATURE, impl=impl).cpu()


_INPUTS = {}


def _inputs(n: int, group: int, min_gap: float = 1e-9):
    """The plan, one input per level (rows) and their permutations."""
    key = (n, group, min_gap)
    if key not in _INPUTS:
        L, S = SHAPES[(n, group)]
        plan = build_cluster_plan(n, group, 0)
        assert (plan.num_levels, plan.slot_size) == (L, S)
        cases = [tie_input(n, L, S, level, min_gap) for level in range(L)]
        _INPUTS[key] = (plan, torch.stack([x for x, _ in cases]),
                        [perm for _, perm in cases])
    return _INPUTS[key]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('n,group', list(SHAPES))
def test_tie_cut_at_each_level_follows_the_rule(impl, n, group):
    plan, x, expected = _inputs(n, group)
    got = _run(impl, x, plan)
    for level, perm in enumerate(expected):
        assert got[level].tolist() == perm, (
            f'{impl}: tie cut at level {level} of {plan.num_levels}')


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('n,group', [(24, 3), (45, 3)])
def test_tie_cut_at_each_level_in_float32(impl, n, group):
    """The float32 ranking paths (packed float keys; the tensor
    implementation's radix sort of all nodes' keys, taken here by
    repeating the rows) on inputs whose other ratios lie 1e-4 apart, far
    beyond float32 rounding; the pair ties exactly as in float64."""
    plan, x, expected = _inputs(n, group, min_gap=1e-4)
    repeat = 1
    if impl == 'tensor':
        from boat_mm.ops.clustering import _RADIX_MIN_NUMEL
        per_row = plan.num_clusters * plan.slot_size
        repeat = -(-_RADIX_MIN_NUMEL // (4 * per_row * len(x)))
    got = _run(impl, x.float().repeat(repeat, 1, 1), plan)
    for row, perm in enumerate(expected * repeat):
        level = row % len(expected)
        assert got[row].tolist() == perm, (
            f'{impl}, float32: tie cut at level {level} of '
            f'{plan.num_levels}')


def test_reference_is_the_tensor_implementation_without_ties():
    """The reference itself, on random inputs without ties."""
    gen = torch.Generator().manual_seed(0)
    for n, group in SHAPES:
        plan = build_cluster_plan(n, group, 0)
        x = torch.randn(3, n, 5, generator=gen, dtype=torch.float64)
        got = balanced_hierarchical_clustering(x, plan, impl='tensor')
        for row in range(3):
            expected, cut_ties, _, _ = reference(x[row], plan.num_levels,
                                                 plan.slot_size)
            assert not cut_ties
            assert got[row].tolist() == expected


def _degenerate_inputs(n: int, levels: int, slot_size: int,
                       rows: int) -> Tuple[torch.Tensor, List[List[int]]]:
    """One-channel tokens of magnitude 1, 2 or 3 and either sign, with
    their reference permutations.

    Every cosine is -1, 0 or 1, so every ratio is 0, 1, ``inf`` or 0/0: a
    token opposite two equal centroids. Ties are everywhere (the rule
    decides them). A row is kept if it holds a 0/0 ratio and no centroid
    sum of exactly 0: rounded in another order (float32, another
    summation order, as onnxruntime's), such a sum is a tiny vector
    of either sign.
    """
    gen = torch.Generator().manual_seed(1)
    inputs, perms = [], []
    while len(inputs) < rows:
        sign = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
        x = (sign * torch.randint(1, 4, (n, 1), generator=gen)).double()
        zeros = []
        perm, _, _, trace = reference(x, levels, slot_size, None, zeros)
        nan = any(
            math.isnan(v) for level in trace for node in level
            for v in node[2])
        if nan and not zeros:
            inputs.append(x)
            perms.append(perm)
    return torch.stack(inputs), perms


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('n,group', [(48, 3), (45, 3)])
def test_zero_over_zero_ratio_ranks_last(impl, dtype, n, group):
    """A ratio of 0/0 ranks after every other token of its node (also
    after ``inf``), as NaN does in torch.sort, on every backend and
    dtype, whatever sign the device gives the NaN; ties keep their order.

    The float32 tensor implementation ranks all nodes with one radix sort
    (taken here by repeating the rows), whose packed keys once put a
    sign-bit NaN before every node and mixed tokens across nodes."""
    plan = build_cluster_plan(n, group, 0)
    x, expected = _degenerate_inputs(n, plan.num_levels, plan.slot_size, 4)
    repeat = 1
    if impl == 'tensor' and dtype == torch.float32:
        from boat_mm.ops.clustering import _RADIX_MIN_NUMEL
        per_row = plan.num_clusters * plan.slot_size
        repeat = -(-_RADIX_MIN_NUMEL // (4 * per_row * len(x)))
    got = _run(impl, x.to(dtype).repeat(repeat, 1, 1), plan)
    assert got.tolist() == expected * repeat


@pytest.mark.parametrize('n,group', [(48, 3), (45, 3)])
def test_zero_over_zero_ratio_ranks_last_in_onnxruntime(n, group, tmp_path):
    """The exported clustering (ONNX TopK instead of the bit-key sorts;
    onnxruntime orders NaN arbitrarily) ranks 0/0 last as well."""
    ort = pytest.importorskip('onnxruntime')
    plan = build_cluster_plan(n, group, 0)
    x, expected = _degenerate_inputs(n, plan.num_levels, plan.slot_size, 4)

    class Clustering(torch.nn.Module):

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return balanced_hierarchical_clustering(
                q, plan, ITERS, TEMPERATURE, impl='tensor')

    path = str(tmp_path / 'clustering.onnx')
    with torch.no_grad():
        torch.onnx.export(
            Clustering(), (x.float(), ), dynamo=True, verbose=False).save(path)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})
    assert got[0].tolist() == expected
