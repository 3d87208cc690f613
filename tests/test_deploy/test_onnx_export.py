# Copyright (c) boat-mm contributors. All rights reserved.
"""boat_mm/deploy/onnx_export.py without exporting: the clusters that
:class:`WithClusters` reports and injects, the checks and the model
builder. Export and onnxruntime are tested in
tests/test_tools/test_pytorch2onnx.py."""
import pytest
import torch
from mmengine.config import Config

from boat_mm.deploy import (DYNAMIC_AXES, ExportWrapper, ScopeError,
                            WithClusters, build_model, check_dynamic,
                            check_fsla_impls, compare)
from boat_mm.models import BOATSwin
from boat_mm.models.utils import FeatureSpaceLocalAttention

ARCH = dict(embed_dims=16, depths=[2, 2, 1, 1], num_heads=[2, 2, 2, 2])


@pytest.fixture(scope='module')
def backbone() -> BOATSwin:
    torch.manual_seed(0)
    return BOATSwin(
        arch=ARCH, drop_path_rate=0., fsla_cfg=dict(group_size=16,
                                                    overlap=4)).eval()


def _tokens_of_each_fsla(model, x):
    """The input of every FSLA call, in call order (forward pre-hooks)."""
    seen = []
    handles = [
        m.register_forward_pre_hook(lambda m, args: seen.append(
            (m, args[0], tuple(args[1])))) for m in model.modules()
        if isinstance(m, FeatureSpaceLocalAttention)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_with_clusters_reports_the_clusters_of_each_call(backbone):
    x = torch.randn(2, 3, 64, 64)
    wrapped = WithClusters(backbone).eval()
    with torch.no_grad():
        out, *perms = wrapped(x)
        plain = backbone(x)
    for a, b in zip(out, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Independently: each FSLA call's clustering from its own input; maps
    # of one cluster have none.
    expected = []
    for module, tokens, hw in _tokens_of_each_fsla(backbone, x):
        perm, _ = module.cluster_perm(tokens, hw)
        if perm is not None:
            expected.append(perm)
    assert len(perms) == len(expected) > 0
    for got, want in zip(perms, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The hooks are gone after the call.
    assert all(not m._cluster_hooks for m in wrapped.fslas)


def test_with_clusters_injects_clusters(backbone):
    x = torch.randn(1, 3, 64, 64)
    wrapped = WithClusters(backbone).eval()
    with torch.no_grad():
        out, *perms = wrapped(x)
        wrapped.inject = list(perms)
        same, *again = wrapped(x)
        # Other clusters (every row's slots reversed) change the output.
        wrapped.inject = [p.flip(-1) for p in perms]
        other, *flipped = wrapped(x)
    wrapped.inject = None
    for a, b in zip(out, same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for got, want in zip(flipped, perms):
        torch.testing.assert_close(got, want.flip(-1))
    assert not torch.allclose(out[0], other[0])


def test_checks():
    assert check_dynamic(()) is False
    assert check_dynamic(('batch', )) is True
    for axes in (('height', ), ('batch', 'width')):
        with pytest.raises(ValueError, match='Export one file per input'):
            check_dynamic(axes)
    with pytest.raises(ValueError, match='unknown dynamic axes'):
        check_dynamic(('depth', ))
    assert DYNAMIC_AXES[0] == 'batch'
    net = BOATSwin(
        arch=ARCH,
        fsla_cfg=dict(group_size=16, overlap=4, attention_impl='cpp'))
    with pytest.raises(ValueError, match="attention_impl='cpp'"):
        check_fsla_impls(net)
    check_fsla_impls(BOATSwin(arch=ARCH))  # 'auto' exports


def test_compare_measures_disagreement():
    """Hand-made logits: the agreement drops by the share of argmaxes that
    move, the differences are those put in."""
    ref = torch.zeros(4, 3, 2, 2)
    ref[:, 1] = 1.  # class 1 everywhere, max |ref| = 1
    same = compare(ref, ref.numpy().copy())
    assert same == dict(max_abs=0., rel=0., argmax=1.)
    out = ref.clone()
    out[0, 2, 0, 0] = 3.  # one of 16 pixels moves to class 2
    out[1, 0, 1, 1] = -0.5  # a change that keeps the argmax
    r = compare(ref, out.numpy())
    assert r['argmax'] == pytest.approx(15 / 16)
    assert r['max_abs'] == pytest.approx(3.) and r['rel'] == pytest.approx(3.)
    with pytest.raises(ValueError, match='shape'):
        compare(ref, out[:2].numpy())


def test_build_model_scopes(repo_root):
    cfg = Config(dict(default_scope='mmdet', model=dict(type='BOATSwin')))
    with pytest.raises(ScopeError, match="default_scope='mmdet'"):
        build_model(cfg)
    cfg = Config.fromfile(f'{repo_root}/configs/boat_swin/'
                          'boat-swin-tiny_16xb64_in1k.py')
    cfg.model.backbone.arch = dict(ARCH)
    cfg.model.head.in_channels = 128
    model, scope = build_model(cfg)
    assert scope == 'mmpretrain' and not model.training
    logits = ExportWrapper(model, scope)(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, cfg.model.head.num_classes)
