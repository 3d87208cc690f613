# Copyright (c) boat-mm contributors. All rights reserved.
"""Clustered-attention problems and their gradients, shared by the tests
of the C++ kernel (``test_clustered_attention_kernel.py``) and of the
Triton kernels (``test_triton_attention.py``)."""
import torch

from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         clustered_attention)


def problem(hw,
            dims,
            heads,
            dtype=torch.float64,
            batch=2,
            seed=0,
            group_size=49,
            overlap=20,
            device='cpu'):
    """qkv, the clustering of its queries (tensor ops, float64) and the
    plan; qkv is drawn in float64, then cast to ``dtype`` on ``device``."""
    N = hw[0] * hw[1]
    plan = build_cluster_plan(N, group_size, overlap, device)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, N, 3 * dims, dtype=torch.float64, generator=gen)
    d = dims // heads
    q = qkv[..., :dims].reshape(batch, N, heads, d).transpose(1, 2)
    perm = balanced_hierarchical_clustering(
        q.reshape(batch * heads, N, d), plan, impl='tensor')
    return (qkv.to(device, dtype).requires_grad_(), perm.to(device), plan)


def run(impl, qkv, perm, plan, heads, hw, scale=None, seed=1, upcast=False):
    """Output, value image and the qkv gradient of a random loss (the
    tensor path in float32 from the same inputs with ``upcast``)."""
    if upcast:
        qkv = qkv.detach().float().requires_grad_()
    out, image = clustered_attention(
        qkv, perm, plan, heads, scale=scale, hw_shape=hw, impl=impl)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen).to(out)
    g_img = torch.randn(image.shape, generator=gen).to(out)
    grad, = torch.autograd.grad((out * g_out).sum() + (image * g_img).sum(),
                                qkv)
    return out, image, grad


def assert_low_precision_close(ours, ref, own, factor=2.5):
    """Each of ``ours`` (a 16-bit run's outputs) is at most ``factor``
    times as far from ``ref`` (the tensor path in float32 from the same
    inputs) as ``own`` (the tensor path in the 16-bit type) is, or
    ``2**-7`` of the largest reference value: a 1 % error of the softmax
    scale (7x the tensor path's own error at bfloat16) fails, where a
    fixed tolerance wide enough for bfloat16 would not."""
    for name, a, b, c in zip(('output', 'image', 'gradient'), ours, ref, own):
        err = (a.float() - b.float()).abs().max().item()
        bound = max(factor * (c.float() - b.float()).abs().max().item(),
                    2**-7 * b.abs().max().item())
        assert err <= bound, (name, err, bound)
