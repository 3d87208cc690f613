# Copyright (c) boat-mm contributors. All rights reserved.
"""ONNX export (tools/deployment/pytorch2onnx.py) checked with onnxruntime.

Tiny BOAT-Swin and BOAT-CSWin classifiers (our ImageNet configs with a tiny
arch) and the demo segmentor (configs/demo/) are exported at two input
sizes, one not a multiple of 32, with and without FSLA, and onnxruntime's
outputs are compared with PyTorch's (the default CPU path, C++ kernels).

FSLA clusters by ranking float32 ratios, and onnxruntime rounds
differently from PyTorch, so a near-tied rank can flip on an occasional
input and move the outputs by more than rounding. The FSLA tests therefore
export every FSLA layer's clustering (``perm``) as an extra output and
compare the clusters themselves: where they are equal, the outputs must
match closely; where onnxruntime ranked a near-tie the other way, PyTorch
is run again with onnxruntime's clusters, and the outputs must match that.
The ranking itself, ties included, is checked exactly on the clustering
alone in float64.
"""
import importlib.util
import os.path as osp
import re
import runpy
import sys
from typing import Optional

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         cpu_kernel_available)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')
SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_16xb64_in1k.py')
CSWIN_T = osp.join(REPO, 'configs', 'boat_cswin',
                   'boat-cswin-tiny_8xb256_in1k.py')
DEMO = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')

_spec = importlib.util.spec_from_file_location('pytorch2onnx', TOOL)
p2o = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(p2o)

# Classifiers: a tiny arch, clusters of 16 so that 64 px inputs give
# several clusters in the first two stages.
CLS_CFG = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, {arch}),
        drop_path_rate=0.0,
        with_fsla={fsla},
        fsla_cfg=dict(group_size=16, overlap=4)),
    head=dict(in_channels=64, num_classes=6))
"""
ARCHS = {
    'swin': (SWIN_T, 'embed_dims=8, depths=[2, 2, 1, 1], '
             'num_heads=[1, 2, 2, 2]'),
    'cswin': (CSWIN_T, 'embed_dims=8, depths=[1, 1, 1, 1], '
              'num_heads=[2, 2, 2, 2]'),
}
CLS_SHAPES = [(64, 64), (72, 52)]
SEG_SHAPES = [(128, 128), (100, 76)]


def _build(tmp, config: str, options: Optional[dict] = None):
    cfg = Config.fromfile(config)
    if options:
        cfg.merge_from_dict(options)
    torch.manual_seed(0)  # the random weights
    model, scope = p2o.build_model(cfg)
    return p2o.ExportWrapper(model, scope)


def _cls_net(tmp, kind: str, fsla: bool):
    base, arch = ARCHS[kind]
    path = tmp / f'{kind}_{fsla}.py'
    path.write_text(CLS_CFG.format(base=base, arch=arch, fsla=fsla))
    return _build(tmp, str(path))


def _seg_net(tmp, fsla: bool):
    return _build(tmp, DEMO, dict(model=dict(backbone=dict(with_fsla=fsla))))


def _export_and_run(tmp, net, shape, x, dynamic=False, optimize=False):
    """Export ``p2o.WithClusters(net)`` at ``shape`` and run it on ``x`` in
    onnxruntime and in PyTorch; returns both output lists. The exporter's
    graph optimizer (half the export time) is off unless ``optimize``."""
    wrapped = p2o.WithClusters(net).eval()
    path = p2o.export_onnx(
        wrapped,
        shape,
        str(tmp / 'net.onnx'),
        dynamic_batch=dynamic,
        optimize=optimize)
    sess = p2o.make_session(path)
    got = [torch.from_numpy(o) for o in sess.run(None, {'input': x.numpy()})]
    with torch.no_grad():
        ref = list(wrapped(x))
    return wrapped, got, ref


def _check(net, shape, tmp, x, close, dynamic=False, optimize=False):
    """Compare onnxruntime and PyTorch; ``close(ref, out)`` asserts the
    tolerance of the task. Returns the number of clustered FSLA calls and
    of those whose clusters differ (near-tie flips)."""
    wrapped, got, ref = _export_and_run(tmp, net, shape, x, dynamic, optimize)
    assert len(got) == len(ref)
    num_fsla = len(ref) - 1
    flipped = [
        i for i in range(1, len(ref)) if not torch.equal(got[i], ref[i])
    ]
    if not flipped:
        close(ref[0], got[0].numpy())
        return num_fsla, 0
    # A near-tie ranked the other way: the clusters are still balanced
    # permutations that agree almost everywhere, and PyTorch on
    # onnxruntime's clusters computes what onnxruntime computed.
    for i in flipped:
        assert torch.equal(got[i].sort(-1).values, ref[i].sort(-1).values)
        assert (got[i] == ref[i]).double().mean() > 0.9
    wrapped.inject = got[1:]
    with torch.no_grad():
        again = wrapped(x)
    close(again[0], got[0].numpy())
    return num_fsla, len(flipped)


def _cls_close(rel):

    def close(ref, out):
        r = p2o.compare(ref, out)
        assert r['rel'] <= rel, r
        assert r['argmax'] == 1.0, r

    return close


def _seg_close(ref, out):
    r = p2o.compare(ref, out)
    assert r['argmax'] >= 0.999, r


def _seg_exact(ref, out):
    r = p2o.compare(ref, out)
    assert r['rel'] <= 1e-5, r
    assert r['argmax'] >= 0.999, r


@pytest.mark.parametrize('shape', CLS_SHAPES)
@pytest.mark.parametrize('kind', ['swin', 'cswin'])
def test_classifier_with_fsla(tmp_path, kind, shape):
    net = _cls_net(tmp_path, kind, fsla=True)
    # One case also checks the exporter's graph optimizer (the tool's
    # default; off elsewhere, it is half the export time).
    optimize = kind == 'swin' and shape == CLS_SHAPES[0]
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1))
    num_fsla, _ = _check(
        net, shape, tmp_path, x, _cls_close(1e-4), optimize=optimize)
    assert num_fsla >= 2  # clustered FSLA layers are really in the graph


# With the CLI test (BOAT-Swin at 72x52), both models at both sizes.
@pytest.mark.parametrize('kind,shape', [('swin', CLS_SHAPES[0]),
                                        ('cswin', CLS_SHAPES[1])])
def test_classifier_without_fsla(tmp_path, kind, shape):
    net = _cls_net(tmp_path, kind, fsla=False)
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1))
    num_fsla, _ = _check(net, shape, tmp_path, x, _cls_close(1e-5))
    assert num_fsla == 0


@pytest.mark.parametrize('shape', SEG_SHAPES)
def test_demo_segmentor_with_fsla(tmp_path, ade_root, shape):
    net = _seg_net(tmp_path, fsla=True)
    image = osp.join(ade_root, 'images', 'validation', 'ADE_val_00000000.jpg')
    x = p2o.load_image(image, net.model, shape)
    num_fsla, _ = _check(net, shape, tmp_path, x, _seg_close)
    assert num_fsla >= 2


def test_demo_segmentor_without_fsla(tmp_path, ade_root):
    shape = SEG_SHAPES[1]
    net = _seg_net(tmp_path, fsla=False)
    image = osp.join(ade_root, 'images', 'validation', 'ADE_val_00000001.jpg')
    x = p2o.load_image(image, net.model, shape)
    num_fsla, _ = _check(net, shape, tmp_path, x, _seg_exact)
    assert num_fsla == 0


class Clustering(nn.Module):
    """The clustering alone, ``(M, N, d) -> perm``."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.plan = build_cluster_plan(num_tokens, 16, 4)

    def forward(self, x):
        return balanced_hierarchical_clustering(x, self.plan)


@pytest.mark.parametrize('num_tokens', [99])
def test_clustering_ranks_ties_as_pytorch(tmp_path, num_tokens):
    """Exact ties (repeated tokens) and float64: the exported ranking
    (TopK) gives exactly PyTorch's clusters, from both implementations."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, num_tokens, 8, generator=gen, dtype=torch.float64)
    # Every token repeated 4 times, and a block of identical tokens: their
    # ratios tie exactly and must stay in position order.
    x = x[:, torch.arange(num_tokens) // 4]
    x[0, :24] = x[0, 50]
    path = str(tmp_path / 'clustering.onnx')
    torch.onnx.export(
        Clustering(num_tokens), (x, ), dynamo=True, verbose=False).save(path)
    sess = p2o.make_session(path)
    got = torch.from_numpy(sess.run(None, {'x': x.numpy()})[0])
    plan = build_cluster_plan(num_tokens, 16, 4)
    for impl in ('tensor', 'cpp'):
        if impl == 'cpp' and not cpu_kernel_available():
            continue
        ref = balanced_hierarchical_clustering(x, plan, impl=impl)
        assert torch.equal(got, ref), impl


def test_cli_checkpoint_and_verify(tmp_path, capsys):
    """The command line on BOAT-Swin without FSLA (the optimised graph of
    the tool's default; with FSLA, test_classifier_with_fsla checks it)."""
    base, arch = ARCHS['swin']
    cfg = tmp_path / 'swin.py'
    cfg.write_text(CLS_CFG.format(base=base, arch=arch, fsla=False))
    net = _build(tmp_path, str(cfg))
    ckpt = str(tmp_path / 'swin.pth')
    torch.save(dict(state_dict=net.model.state_dict()), ckpt)
    out = str(tmp_path / 'swin.onnx')
    argv = [
        TOOL,
        str(cfg), '--checkpoint', ckpt, '--shape', '72', '52', '--out', out,
        '--verify'
    ]
    old = sys.argv
    try:
        sys.argv = argv
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(TOOL, run_name='__main__')
    finally:
        sys.argv = old
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in ('image', 'random'):
        found = re.search(
            rf'onnxruntime vs PyTorch, {name} input: max abs diff \S+, '
            rf'relative (\S+), top-1 equal 100.00 %', text)
        assert found and float(found[1]) <= 1e-5, text
    # The file holds the checkpoint's weights.
    x = torch.randn(1, 3, 72, 52, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    _cls_close(1e-5)(ref, p2o.run_onnxruntime(out, x))
    # The exported H x W and batch are fixed, with a clear error.
    with pytest.raises(ValueError, match='exported for 72x52 inputs'):
        p2o.run_onnxruntime(out, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='exported for batch 1'):
        p2o.run_onnxruntime(out, torch.randn(2, 3, 72, 52))


def test_fsla_kernel_impl_is_refused(tmp_path):
    base, arch = ARCHS['swin']
    cfg = tmp_path / 'swin.py'
    cfg.write_text(
        CLS_CFG.format(base=base, arch=arch,
                       fsla=True).replace('overlap=4',
                                          "overlap=4, clustering_impl='cpp'"))
    net = _build(tmp_path, str(cfg))
    with pytest.raises(ValueError, match="clustering_impl='cpp'"):
        p2o.export_onnx(net, (64, 64), str(tmp_path / 'x.onnx'))
    assert not osp.exists(tmp_path / 'x.onnx')


def test_dynamic_batch_is_refused(tmp_path):
    net = _cls_net(tmp_path, 'swin', fsla=False)
    with pytest.raises(
            ValueError, match=r'dynamic batch \(--dynamic-shape\) is not'):
        p2o.export_onnx(
            net, (64, 64), str(tmp_path / 'x.onnx'), dynamic_batch=True)
