# Copyright (c) boat-mm contributors. All rights reserved.
"""FSLA and the two backbones with both Triton kernels in the loop
(``clustering_impl='triton'``, ``attention_impl='triton'``).

The kernel tests (``test_triton_clustering.py``, ``test_triton_attention.py``)
check each op alone; these check that the module and the backbones compose
them right: the cluster plan per resolution, padding for any ``H x W``,
the value image, autograd through both ops, every stage of a backbone.
Float64, so that the hard clustering has no near-ties to flip.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(``tests/conftest.py``); with one, compiled on CUDA
(``benchmarks/gpu_check.sh``).
"""
from typing import Tuple

import pytest
import torch
# The interpreter runs many tiny numpy ops: threads only cost.
from test_fsla import one_thread  # noqa: F401 (autouse fixture)
from test_fsla import (check_module_against_reference,
                       second_derivative_or_error)

from boat_mm.models.backbones import BOATCSWin, BOATSwin
from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import _backends

pytest.importorskip('triton')

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
if DEVICE == 'cpu' and not _backends.triton_interpreter_enabled():
    pytest.skip(
        'the Triton kernels need CUDA, or TRITON_INTERPRET=1 (set by '
        'tests/conftest.py without a GPU)',
        allow_module_level=True)

TRITON = dict(clustering_impl='triton', attention_impl='triton')

# hw, dims, heads, extra FSLA arguments: a published size (4 clusters of
# 49), a padded one (143 tokens: clusters of 35 and 36), a map with
# several sibling pairs and no overlap, and a single cluster.
MODULE_CASES = [((14, 14), 32, 4, {}), ((11, 13), 16, 2, {}),
                ((16, 20), 16, 2, dict(group_size=24, overlap=0)),
                ((5, 7), 16, 2, {})]


@pytest.mark.triton
@pytest.mark.parametrize('hw,dims,heads,kwargs', MODULE_CASES)
def test_module_on_triton_equals_reference(hw, dims, heads, kwargs):
    """Output, input gradient and every parameter gradient of FSLA on the
    Triton kernels equal the slow reference of test_fsla.py."""
    check_module_against_reference(hw, dims, heads, 'triton', DEVICE, **kwargs)


@pytest.mark.triton
def test_second_derivative_is_refused():
    """The Triton kernels refuse a second derivative through FSLA (a
    gradient penalty) with the fix, after the right first derivative."""
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2, **TRITON).double().to(DEVICE)
    x = torch.randn(
        2, 196, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with pytest.raises(
            RuntimeError,
            match="differentiable once .* "
            r"attention_impl='tensor'.*SDPBackend.MATH"):
        second_derivative_or_error(m, (14, 14), x)


ARCHS = {
    BOATSwin: dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
    # CSWin splits heads between two stripe branches: even counts.
    BOATCSWin:
    dict(embed_dims=24, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4)),
}


def _train_step(model: torch.nn.Module, img: torch.Tensor,
                weights: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor]:
    outs = model(img)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs


@pytest.mark.triton
@pytest.mark.parametrize(
    'family', [BOATSwin, BOATCSWin], ids=lambda c: c.__name__)
def test_backbone_on_triton_equals_tensor_path(family):
    """Every stage's map and every parameter's gradient of a backbone on
    the Triton kernels equal the same backbone on the tensor ops (the
    path test_fsla.py checks against the published algorithm), for an
    input whose stage maps need padded clusters (23x19: 8 clusters of
    54-55 tokens) and odd sizes. Slots stay <= 64 (64-row tiles): a
    float64 backward of 128-row tiles does not fit a GPU's shared memory
    (test_triton_attention.py)."""
    kwargs = dict(
        arch=ARCHS[family], out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    torch.manual_seed(0)
    ref = family(
        **kwargs,
        fsla_cfg=dict(clustering_impl='tensor',
                      attention_impl='tensor')).double()
    ours = family(**kwargs, fsla_cfg=TRITON).double()
    ours.load_state_dict(ref.state_dict())
    ours.to(DEVICE)
    assert any(
        isinstance(m, FeatureSpaceLocalAttention)
        and m.clustering_impl == m.attention_impl == 'triton'
        for m in ours.modules())

    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 92, 76, dtype=torch.float64, generator=gen)
    shapes = [(23, 19), (12, 10), (6, 5), (3, 3)]
    weights = tuple(
        torch.randn(2, 24 * 2**i, *hw, dtype=torch.float64, generator=gen)
        for i, hw in enumerate(shapes))
    outs_ref = _train_step(ref, img, weights)
    outs = _train_step(ours, img.to(DEVICE),
                       tuple(w.to(DEVICE) for w in weights))
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=0)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(
            q.grad.cpu(), p.grad, atol=1e-9, rtol=0, msg=name)
