# Copyright (c) boat-mm contributors. All rights reserved.
"""boat_mm/deploy/onnx_export.py without exporting: the clusters that
:class:`WithClusters` reports and injects, the checks, the model builder
and the models it refuses, and the channel order of every data
preprocessor. Export and onnxruntime are tested in
tests/test_tools/test_pytorch2onnx.py."""
import glob
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import BaseDataPreprocessor, ImgDataPreprocessor
from mmpretrain.models.utils.data_preprocessor import (
    ClsDataPreprocessor, MultiModalDataPreprocessor, SelfSupDataPreprocessor,
    TwoNormDataPreprocessor, VideoDataPreprocessor)
from mmseg.models.data_preprocessor import SegDataPreProcessor

from boat_mm.deploy import (DYNAMIC_AXES, ExportWrapper, ModelKindError,
                            ScopeError, WithClusters, build_model,
                            check_dynamic, check_exportable, check_fsla_impls,
                            compare, converts_to_rgb, input_description)
from boat_mm.deploy.onnx_export import FINE_TUNE_CFGS
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


def _tiny_cls_cfg(repo_root: str) -> Config:
    """BOAT-Swin-T's classification config with a tiny arch."""
    cfg = Config.fromfile(f'{repo_root}/configs/boat_swin/'
                          'boat-swin-tiny_16xb64_in1k.py')
    cfg.model.backbone.arch = dict(ARCH)
    cfg.model.head.in_channels = 128
    return cfg


def test_build_model_scopes(repo_root):
    cfg = Config(dict(default_scope='mmdet', model=dict(type='BOATSwin')))
    with pytest.raises(ScopeError, match="default_scope='mmdet'"):
        build_model(cfg)
    cfg = _tiny_cls_cfg(repo_root)
    model, scope = build_model(cfg)
    assert scope == 'mmpretrain' and not model.training
    logits = ExportWrapper(model, scope)(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, cfg.model.head.num_classes)


def _bare(cls: type) -> nn.Module:
    """An instance of a model class, for the type check only: building
    the real ones (a depth head, test-time augmentation) costs more and
    tells nothing more."""
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    return model


def test_refuses_what_does_not_export_as_logits(repo_root, tmp_path):
    """Models whose output is not the documented logits are refused,
    before a checkpoint is read and by ExportWrapper too (before: SimMIM
    exported its feature map as "class logits")."""
    # A SimMIM pre-training config, its backbone made tiny.
    cfg = Config.fromfile(
        f'{repo_root}/configs/boat_swin/simmim_boat-swin-base-w6_8xb256-'
        'amp-coslr-100e_in1k-192px.py')
    cfg.model.backbone.arch = dict(ARCH)
    cfg.model.neck.in_channels = 128
    missing = str(tmp_path / 'missing.pth')  # never opened: refused first
    with pytest.raises(ModelKindError) as e:
        build_model(cfg, missing)
    msg = str(e.value)
    assert msg.startswith('the config builds a SimMIM, a self-supervised '
                          'pre-training model') and '\n' not in msg
    assert 'export the fine-tuned classifier config' in msg
    # docs/deployment.md quotes it.
    with open(osp.join(repo_root, 'docs', 'deployment.md')) as f:
        doc = ' '.join(f.read().split())
    assert f'`pytorch2onnx.py: error: {msg.split(";")[0]}; ...`' in doc
    # The configs it names exist, and are fine-tuned classifiers.
    named = glob.glob(osp.join(repo_root, FINE_TUNE_CFGS))
    assert FINE_TUNE_CFGS in msg and len(named) >= 3
    for path in named:
        model = Config.fromfile(path).model
        assert model.type == 'ImageClassifier' and model.head is not None
    # A classifier without a head; with one it exports.
    cfg = _tiny_cls_cfg(repo_root)
    cfg.model.head = None
    with pytest.raises(
            ModelKindError,
            match='ImageClassifier without a '
            "head .* model.head=dict.type='LinearClsHead'"):
        build_model(cfg)
    model, scope = build_model(_tiny_cls_cfg(repo_root))
    check_exportable(model, scope)
    model.head = None
    with pytest.raises(ModelKindError, match='without a head'):
        ExportWrapper(model, scope)
    # Segmentors: EncoderDecoder and its cascade export; a depth
    # estimator, a test-time augmented model or a model of the other
    # scope does not.
    from mmpretrain.models import ImageClassifier
    from mmseg.models import SegTTAModel
    from mmseg.models.segmentors import (CascadeEncoderDecoder, DepthEstimator,
                                         EncoderDecoder)
    for cls in (EncoderDecoder, CascadeEncoderDecoder):
        check_exportable(_bare(cls), 'mmseg')
    for cls, scope in ((DepthEstimator, 'mmseg'), (SegTTAModel, 'mmseg'),
                       (EncoderDecoder, 'mmpretrain'), (ImageClassifier,
                                                        'mmseg')):
        with pytest.raises(
                ModelKindError,
                match=f"default_scope='{scope}'. builds a {cls.__name__}, "
                'which is not exported; pytorch2onnx.py exports an '
                'mmpretrain ImageClassifier with a head'):
            check_exportable(_bare(cls), scope)


def _image() -> torch.Tensor:
    """A ``(3, 2, 2)`` uint8 image whose channels differ: 10, 20, 30."""
    return torch.tensor([10, 20, 30],
                        dtype=torch.uint8).view(3, 1, 1).repeat(1, 2, 2)


# Each data preprocessor class: how to make it with its channel flag, how
# to run it on one image, how to read the image's first pixel back.
_NCHW = dict(
    run=lambda dp: dp(dict(inputs=[_image()]))['inputs'],
    first=lambda out: out[0][:, 0, 0])
# Two views of a batch of one (TwoNormDataPreprocessor needs two).
_SELFSUP = dict(
    run=lambda dp: dp(dict(inputs=[_image()[None]] * 2, data_samples=None))[
        'inputs'],
    first=lambda out: out[0][0, :, 0, 0])
_NORM = dict(mean=[0.] * 3, std=[1.] * 3)
PREPROCESSORS = {
    'ClsDataPreprocessor':
    dict(make=lambda f: ClsDataPreprocessor(to_rgb=f), **_NCHW),
    'SelfSupDataPreprocessor(to_rgb)':
    dict(make=lambda f: SelfSupDataPreprocessor(to_rgb=f), **_SELFSUP),
    'SelfSupDataPreprocessor(bgr_to_rgb)':
    dict(make=lambda f: SelfSupDataPreprocessor(bgr_to_rgb=f), **_SELFSUP),
    'TwoNormDataPreprocessor':
    dict(
        make=lambda f: TwoNormDataPreprocessor(
            to_rgb=f, second_mean=[0.] * 3, second_std=[1.] * 3, **_NORM),
        **_SELFSUP),
    'VideoDataPreprocessor':
    dict(
        make=lambda f: VideoDataPreprocessor(to_rgb=f),
        run=lambda dp: dp(
            dict(inputs=_image()[None, None], data_samples=None))['inputs'],
        first=lambda out: out[0, 0, :, 0, 0]),
    'MultiModalDataPreprocessor':
    dict(
        make=lambda f: MultiModalDataPreprocessor(to_rgb=f),
        run=lambda dp: dp(dict(inputs=_image()[None]))['images'],
        first=lambda out: out[0, :, 0, 0]),
    'SegDataPreProcessor':
    dict(make=lambda f: SegDataPreProcessor(bgr_to_rgb=f, **_NORM), **_NCHW),
    'SegDataPreProcessor(rgb_to_bgr)':
    dict(make=lambda f: SegDataPreProcessor(rgb_to_bgr=f), **_NCHW),
    'ImgDataPreprocessor':
    dict(make=lambda f: ImgDataPreprocessor(bgr_to_rgb=f, **_NORM), **_NCHW),
}


@pytest.mark.parametrize('flag', [True, False])
@pytest.mark.parametrize('name', sorted(PREPROCESSORS))
def test_channel_order_of_each_data_preprocessor(name, flag):
    """What the tool prints as the input's channel order is what the data
    preprocessor does to an image as mmcv loads it (BGR), seen by running
    it (before: the preprocessors of MMEngine, which store
    `_channel_conversion`, were said to give BGR)."""
    spec = PREPROCESSORS[name]
    dp = spec['make'](flag)
    with torch.no_grad():
        first = spec['first'](spec['run'](dp)).tolist()
    assert first in ([10., 20., 30.], [30., 20., 10.])
    swapped = first == [30., 20., 10.]
    assert swapped == flag  # the flag does what its name says
    assert converts_to_rgb(dp) is swapped
    model = nn.Module()
    model.data_preprocessor = dp
    said = input_description(model)
    assert said.startswith('RGB channels' if swapped else 'BGR channels')


def test_a_preprocessor_without_flags_keeps_bgr():
    dp = BaseDataPreprocessor()
    out = dp(dict(inputs=[_image()]))['inputs'][0]
    assert out[:, 0, 0].tolist() == [10, 20, 30]
    assert converts_to_rgb(dp) is False
