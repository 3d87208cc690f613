# Copyright (c) boat-mm contributors. All rights reserved.
"""FLOP counting (boat_mm/analysis/complexity.py) against hand counts of
small modules and torch's own FLOP counter."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import boat_mm  # noqa: F401
from boat_mm.analysis.complexity import (MAC_OPERATORS, get_model_complexity,
                                         sdpa_macs)
from boat_mm.analysis.flop_handles import attention_handle
from boat_mm.models.utils import (BOATShiftWindowMSA, CSWinAttention,
                                  FeatureSpaceLocalAttention)

SDPA = F.scaled_dot_product_attention


class OnMap(nn.Module):
    """Calls ``module(tokens, hw_shape)`` so the analyzer can trace it."""

    def __init__(self, module: nn.Module, hw: tuple):
        super().__init__()
        self.module, self.hw = module, hw

    def forward(self, x):
        return self.module(x, self.hw)


def count(module, hw, channels, masked_attention='allowed'):
    x = torch.randn(1, hw[0] * hw[1], channels)
    return get_model_complexity(
        OnMap(module, hw), inputs=x, masked_attention=masked_attention)


# (H, W): clusters G, slots per cluster S, real tokens per cluster.
FSLA_CASES = {
    (14, 14): (4, 49, [49, 49, 49, 49]),  # 49 * 2**2: the published case
    (9, 11): (2, 50, [50, 49]),  # 99 tokens: one padding slot
}


@pytest.mark.parametrize('hw', list(FSLA_CASES))
def test_fsla_flops_match_hand_count(hw):
    C, h, B = 32, 2, 1
    d, N = C // h, hw[0] * hw[1]
    G, S, sizes = FSLA_CASES[hw]
    info = count(FeatureSpaceLocalAttention(C, h), hw, C)
    ops = info['by_operator']
    assert ops['linear'] == B * N * C * 3 * C + B * N * C * C  # qkv, proj
    assert ops['conv'] == B * N * C * 9  # depthwise 3x3 on v
    # Cluster 2j: its own tokens + the first 20 of 2j+1 as keys; cluster
    # 2j+1: its own + the last 20 of 2j. A padding slot attends to itself.
    pairs = 0
    for j in range(0, G, 2):
        a, b = sizes[j], sizes[j + 1]
        pairs += a * (a + min(b, 20)) + b * (b + min(a, 20))
        pairs += 2 * S - a - b
    assert ops['sdpa'] == B * h * pairs * 2 * d  # q @ k^T and attn @ v
    # Per level: centroid means, 2 k-means iterations x (similarities,
    # update), final similarities: 6 matmuls of 2 x slots x d per head.
    levels = G.bit_length() - 1
    assert ops['fsla_clustering'] == levels * 6 * 2 * B * h * G * S * d
    assert info['flops'] == info['macs'] == sum(ops.values())
    assert info['params'] == sum(
        p.numel() for p in FeatureSpaceLocalAttention(C, h).parameters())

    # The counting patches are gone after the analysis.
    import boat_mm.models.utils.fsla as fsla_module
    from boat_mm.ops import balanced_hierarchical_clustering
    assert F.scaled_dot_product_attention is SDPA
    assert fsla_module.balanced_hierarchical_clustering is \
        balanced_hierarchical_clustering

    # Dense: every sibling pair runs a full 2S x 2S attention.
    dense = count(FeatureSpaceLocalAttention(C, h), hw, C, 'dense')
    assert dense['by_operator']['sdpa'] == B * h * (G // 2) * (2 *
                                                               S)**2 * 2 * d


@pytest.mark.parametrize('hw', list(FSLA_CASES))
@pytest.mark.parametrize('mode', ['allowed', 'dense'])
def test_fsla_flops_same_with_and_without_kernels(hw, mode, monkeypatch):
    """The traced op (C++ kernels) and the tensor ops (masked SDPA) are
    counted alike."""
    from boat_mm.ops import _backends, cpu_kernel_available
    if not cpu_kernel_available():
        pytest.skip('boat_mm._C is not built')
    C, h = 32, 2
    attn = FeatureSpaceLocalAttention(C, h)
    with_op = count(attn, hw, C, mode)['by_operator']
    monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', False)
    assert count(attn, hw, C, mode)['by_operator'] == with_op


def test_fsla_single_cluster_is_plain_attention():
    C, h, hw = 32, 2, (7, 7)
    ops = count(FeatureSpaceLocalAttention(C, h), hw, C)['by_operator']
    assert ops['sdpa'] == 2 * h * 49 * 49 * (C // h)
    assert 'fsla_clustering' not in ops


def test_window_attention_flops_match_hand_count():
    C, h, ws, hw = 16, 2, 7, (14, 14)
    d, nwin, L = C // h, 4, ws * ws
    attn = BOATShiftWindowMSA(C, h, ws, shift_size=3)
    info = count(attn, hw, C)
    ops = info['by_operator']
    assert ops['linear'] == nwin * (L * C * 3 * C + L * C * C)
    assert ops['matmul'] == nwin * 2 * h * L * L * d  # q @ k^T, attn @ v
    assert info['flops'] == ops['linear'] + ops['matmul']


@pytest.mark.parametrize('side', [14, 12])
def test_cswin_attention_flops_match_hand_count(side):
    C, h, split = 32, 4, 7
    N, half, hb = side * side, C // 2, h // 2  # per stripe branch
    ops = count(CSWinAttention(C, h, split), (side, side), C)['by_operator']
    padded = -(-side // split) * split
    stripes, slots = padded // split, side * split
    # Padding is along the stripe's short side; padded keys are masked.
    real_keys = side * (split - (padded - side) // stripes)
    assert ops['linear'] == N * C * 3 * C + N * C * C
    assert ops['sdpa'] == 2 * stripes * hb * slots * real_keys * 2 * (
        half // hb)
    assert ops['conv'] == 2 * stripes * slots * half * 9  # LePE per stripe


def test_sdpa_macs_rules():
    q, v = (2, 3, 5, 8), (2, 3, 6, 4)
    assert sdpa_macs(q, v[:3] + (8, ), v) == 2 * 3 * 5 * 6 * (8 + 4)
    causal = sum(min(i + 1, 6) for i in range(5))
    assert sdpa_macs(q, (2, 3, 6, 8), v, is_causal=True) == \
        2 * 3 * causal * 12
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[:, :2] = True  # broadcast over batch and heads
    assert sdpa_macs(q, (2, 3, 6, 8), v, mask) == 2 * 3 * 5 * 2 * 12
    assert sdpa_macs(q, (2, 3, 6, 8), v, mask, masked_attention='dense') \
        == 2 * 3 * 5 * 6 * 12
    # Additive masks cannot tell allowed pairs apart: dense.
    assert sdpa_macs(q, (2, 3, 6, 8), v, mask.float()) == 2 * 3 * 5 * 6 * 12
    with pytest.raises(ValueError, match='masked_attention'):
        sdpa_macs(q, q, v, masked_attention='sparse')
    # FSLA's handle refuses it when made, not when it would count.
    with pytest.raises(ValueError, match='masked_attention'):
        attention_handle('sparse')


@pytest.mark.parametrize('backbone', [
    dict(
        type='BOATSwin',
        arch=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])),
    dict(
        type='BOATCSWin',
        arch=dict(embed_dims=16, depths=[1, 2, 2, 1], num_heads=[2, 2, 4, 4]))
])
def test_whole_model_matches_torch_flop_counter(backbone, monkeypatch):
    """Dense counting of a tiny backbone equals torch's FlopCounterMode
    (2 FLOPs per MAC). Its SDPA is forced to the math backend, whose
    matmuls torch counts densely (the fused CPU kernels it does not see);
    likewise the clustering runs on tensor ops, not the opaque C++ kernel."""
    from boat_mm.ops import _backends
    from boat_mm.registry import MODELS
    monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', False)
    model = MODELS.build(dict(backbone, drop_path_rate=0.)).eval()
    x = torch.randn(1, 3, 64, 64)
    info = get_model_complexity(model, inputs=x, masked_attention='dense')
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        model(x)
    assert info['macs'] == counter.get_total_flops() // 2
    assert info['by_operator']['fsla_clustering'] > 0
    # Counting only allowed pairs is cheaper, everything else equal.
    allowed = get_model_complexity(model, inputs=x)
    assert allowed['macs'] < info['macs']
    assert allowed['macs'] - allowed['by_operator']['sdpa'] == \
        info['macs'] - info['by_operator']['sdpa']
    assert set(allowed['by_operator']) - {'layer_norm'} <= MAC_OPERATORS


@pytest.mark.parametrize('kernel', [True, False], ids=['cpp', 'tensor'])
def test_mmengine_counter_in_training_mode_with_grad(kernel, monkeypatch):
    """mmengine's ``get_model_complexity_info`` as the upstream get_flops
    tools call it (grad enabled, no ``torch.no_grad``): on the tensor ops
    the trace used to fail inside ``_GatherQKV`` (shapes are 0-dim tensors
    under the tracer), and the count equals that of a no-grad trace."""
    from mmengine.analysis import get_model_complexity_info

    from boat_mm.ops import _backends, cpu_kernel_available
    from boat_mm.registry import MODELS
    if kernel and not cpu_kernel_available():
        pytest.skip('boat_mm._C is not built')
    monkeypatch.setattr(_backends, '_HAS_CPU_KERNEL', kernel)
    model = MODELS.build(
        dict(
            type='BOATCSWin',
            arch=dict(
                embed_dims=16, depths=[1, 2, 2, 1], num_heads=[2, 2, 4, 4]),
            drop_path_rate=0.)).train()

    def flops() -> int:
        return get_model_complexity_info(
            model, input_shape=(3, 64, 64), show_table=False,
            show_arch=False)['flops']

    with torch.no_grad():
        expected = flops()
    assert torch.is_grad_enabled()
    assert flops() == expected
