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
import contextlib
import os.path as osp
import re
import runpy
import sys
import threading
from typing import Optional

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from repo_scripts import REPO, load_script

from boat_mm.deploy import (ExportWrapper, WithClusters, build_model, compare,
                            export_onnx, load_image, make_session,
                            run_onnxruntime)
from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         cpu_kernel_available)

TOOL = osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')
SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_16xb64_in1k.py')
CSWIN_T = osp.join(REPO, 'configs', 'boat_cswin',
                   'boat-cswin-tiny_8xb256_in1k.py')
DEMO = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')

# The tool itself, for its options and command line.
p2o = load_script(TOOL, 'pytorch2onnx')

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
    model, scope = build_model(cfg)
    return ExportWrapper(model, scope)


def _cls_net(tmp, kind: str, fsla: bool):
    base, arch = ARCHS[kind]
    path = tmp / f'{kind}_{fsla}.py'
    path.write_text(CLS_CFG.format(base=base, arch=arch, fsla=fsla))
    return _build(tmp, str(path))


def _seg_net(tmp, fsla: bool):
    return _build(tmp, DEMO, dict(model=dict(backbone=dict(with_fsla=fsla))))


def _check(net, shape, tmp, xs, close, dynamic=False):
    """Export ``WithClusters(net)`` at ``shape`` (with a dynamic batch
    if ``dynamic``), run it on each input of ``xs`` in onnxruntime and in
    PyTorch and compare; ``close(ref, out)`` asserts the tolerance of the
    task. The file is optimized as the tool's are. Returns the number of
    clustered FSLA calls and of those whose clusters differ (near-tie
    flips), over all inputs."""
    wrapped = WithClusters(net).eval()
    path = export_onnx(
        wrapped,
        shape,
        str(tmp / 'net.onnx'),
        dynamic=('batch', ) if dynamic else ())
    sess = make_session(path)
    assert isinstance(sess.get_inputs()[0].shape[0], int) != dynamic
    total = [0, 0]
    for x in xs:
        got = [
            torch.from_numpy(o) for o in sess.run(None, {'input': x.numpy()})
        ]
        for i, n in enumerate(_compare(wrapped, got, x, close)):
            total[i] += n
    return tuple(total)


def _compare(wrapped, got, x, close):
    """onnxruntime's outputs ``got`` against PyTorch's on ``x``."""
    with torch.no_grad():
        ref = list(wrapped(x))
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
    try:
        with torch.no_grad():
            again = wrapped(x)
    finally:
        wrapped.inject = None
    close(again[0], got[0].numpy())
    return num_fsla, len(flipped)


def _cls_close(rel):

    def close(ref, out):
        r = compare(ref, out)
        assert r['rel'] <= rel, r
        assert r['argmax'] == 1.0, r

    return close


def _seg_close(ref, out):
    r = compare(ref, out)
    assert r['argmax'] >= 0.999, r


def _seg_exact(ref, out):
    r = compare(ref, out)
    assert r['rel'] <= 1e-5, r
    assert r['argmax'] >= 0.999, r


def _randn(batch, shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *shape, generator=gen)


@pytest.mark.parametrize('shape', CLS_SHAPES)
@pytest.mark.parametrize('kind', ['swin', 'cswin'])
def test_classifier_with_fsla(tmp_path, kind, shape):
    net = _cls_net(tmp_path, kind, fsla=True)
    num_fsla, _ = _check(net, shape, tmp_path, [_randn(1, shape)],
                         _cls_close(1e-4))
    assert num_fsla >= 2  # clustered FSLA layers are really in the graph


# With the CLI test (BOAT-Swin at 72x52), both models at both sizes.
@pytest.mark.parametrize('kind,shape', [('swin', CLS_SHAPES[0]),
                                        ('cswin', CLS_SHAPES[1])])
def test_classifier_without_fsla(tmp_path, kind, shape):
    net = _cls_net(tmp_path, kind, fsla=False)
    num_fsla, _ = _check(net, shape, tmp_path, [_randn(1, shape)],
                         _cls_close(1e-5))
    assert num_fsla == 0
    # The exported H x W and batch are fixed, with a clear error.
    path = str(tmp_path / 'net.onnx')
    with pytest.raises(
            ValueError, match=f'exported for {shape[0]}x{shape[1]} inputs'):
        run_onnxruntime(path, _randn(1, (shape[0] + 8, shape[1])))
    with pytest.raises(
            ValueError, match=r'exported for batch 1.*--dynamic-shape'):
        run_onnxruntime(path, _randn(2, shape))


def _ade_images(ade_root, net, shape, indices):
    """Validation images of the generated dataset, as one batch."""
    return torch.cat([
        load_image(
            osp.join(ade_root, 'images', 'validation', f'ADE_val_{i:08d}.jpg'),
            net.model, shape) for i in indices
    ])


@pytest.mark.parametrize('shape', SEG_SHAPES)
def test_demo_segmentor_with_fsla(tmp_path, ade_root, shape):
    net = _seg_net(tmp_path, fsla=True)
    # The second size with a dynamic batch (FSLA and mmseg's heads; the
    # CLI test covers BOAT-Swin), run on batches of 1 and 3 (the export
    # traces 2).
    dynamic = shape == SEG_SHAPES[1]
    xs = [_ade_images(ade_root, net, shape, [0])]
    if dynamic:
        xs.append(_ade_images(ade_root, net, shape, [1, 2, 3]))
    num_fsla, _ = _check(net, shape, tmp_path, xs, _seg_close, dynamic=dynamic)
    assert num_fsla >= 2 * len(xs)


def test_demo_segmentor_without_fsla(tmp_path, ade_root):
    shape = SEG_SHAPES[1]
    net = _seg_net(tmp_path, fsla=False)
    xs = [_ade_images(ade_root, net, shape, [1])]
    num_fsla, _ = _check(net, shape, tmp_path, xs, _seg_exact)
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
    sess = make_session(path)
    got = torch.from_numpy(sess.run(None, {'x': x.numpy()})[0])
    plan = build_cluster_plan(num_tokens, 16, 4)
    for impl in ('tensor', 'cpp'):
        if impl == 'cpp' and not cpu_kernel_available():
            continue
        ref = balanced_hierarchical_clustering(x, plan, impl=impl)
        assert torch.equal(got, ref), impl


def test_cli_checkpoint_and_verify(tmp_path, capsys):
    """The command line on BOAT-Swin without FSLA, with a dynamic batch (the
    optimised graph of the tool's default; with FSLA,
    test_classifier_with_fsla checks it)."""
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
        '--verify', '--dynamic-shape'
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
    assert 'N dynamic' in text
    for name in ('image', 'random', r'random \(batch 3\)'):
        found = re.search(
            rf'onnxruntime vs PyTorch, {name} input: max abs diff \S+, '
            rf'relative (\S+), top-1 equal 100.00 %', text)
        assert found and float(found[1]) <= 1e-5, text
    # The file holds the checkpoint's weights; any batch runs.
    x = _randn(4, (72, 52))
    with torch.no_grad():
        ref = net(x)
    _cls_close(1e-5)(ref, run_onnxruntime(out, x))


def test_cli_without_normalisation(tmp_path, capsys):
    """A config whose data preprocessor has no mean and std exports a
    graph on the pixel values as read, and the tool says so (before: it
    printed "minus mean [0.0, 0.0, 0.0], divided by std [1.0, 1.0, 1.0]"
    and called the input normalised)."""
    import cv2
    import numpy as np
    base, arch = ARCHS['swin']
    cfg = tmp_path / 'raw.py'
    cfg.write_text(
        CLS_CFG.format(base=base, arch=arch, fsla=False) +
        'data_preprocessor = dict(mean=None, std=None)\n')
    net = _build(tmp_path, str(cfg))
    ckpt = str(tmp_path / 'raw.pth')
    torch.save(dict(state_dict=net.model.state_dict()), ckpt)
    out = str(tmp_path / 'raw.onnx')
    image = str(tmp_path / 'image.png')
    pixels = np.random.default_rng(0).integers(
        0, 256, (72, 52, 3), dtype=np.uint8)
    cv2.imwrite(image, pixels)
    assert p2o.main([
        str(cfg), '--checkpoint', ckpt, '--shape', '72', '52', '--out', out,
        '--verify', '--image', image
    ]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = ("input: RGB channels, pixel values as read (0-255), not "
            "normalised: the config's data_preprocessor has no mean and "
            "std.")
    assert said in lines, lines
    assert not any('minus mean' in line or 'normalised, N' in line
                   for line in lines), lines
    # docs/deployment.md quotes the line.
    with open(osp.join(REPO, 'docs', 'deployment.md')) as f:
        assert said in ' '.join(f.read().split())
    # What the line says, independently: the file on the image's RGB
    # pixels as read (no resize at this size) computes what the model
    # computes from the image through its own data preprocessor.
    data = net.model.data_preprocessor(
        dict(inputs=[torch.from_numpy(pixels).permute(2, 0, 1)]))
    with torch.no_grad():
        ref = net.model(data['inputs'], mode='tensor')
    rgb = torch.from_numpy(pixels[..., ::-1].copy()).permute(2, 0, 1)
    _cls_close(1e-5)(ref, run_onnxruntime(out, rgb[None].float()))


def test_fsla_kernel_impl_is_refused(tmp_path):
    base, arch = ARCHS['swin']
    cfg = tmp_path / 'swin.py'
    cfg.write_text(
        CLS_CFG.format(base=base, arch=arch,
                       fsla=True).replace('overlap=4',
                                          "overlap=4, clustering_impl='cpp'"))
    net = _build(tmp_path, str(cfg))
    with pytest.raises(ValueError, match="clustering_impl='cpp'"):
        export_onnx(net, (64, 64), str(tmp_path / 'x.onnx'))
    assert not osp.exists(tmp_path / 'x.onnx')


def test_dynamic_height_width_are_refused(tmp_path):
    assert p2o.parse_args(
        ['c.py', '--shape', '8', '8', '--out', 'x.onnx',
         '--dynamic-shape']).dynamic_shape == ['batch']
    net = _cls_net(tmp_path, 'swin', fsla=False)
    for axes, what in [(('batch', 'height'), 'height'), (('width', ), 'width'),
                       (('height', 'width'), 'height and width')]:
        with pytest.raises(ValueError) as exc:
            export_onnx(net, (64, 64), str(tmp_path / 'x.onnx'), dynamic=axes)
        msg = str(exc.value)
        assert msg.startswith(f"a dynamic {what} is not supported: FSLA's "
                              f'cluster layout'), msg
        assert 'Export one file per input size' in msg, msg
    assert not osp.exists(tmp_path / 'x.onnx')


class _Halves(nn.Module):
    """Two Slices of one tensor, at the half of its last axis: the
    pattern of onnxscript's ``SlicesSplit`` rule."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return x[..., :w] * 2 - x[..., w:2 * w]


def test_optimizer_without_the_quadratic_rule(tmp_path, monkeypatch):
    """export_onnx runs torch's graph optimizer without consulting
    ``SlicesSplit`` (whose matching walks the whole graph per Slice: most
    of a BOAT export's time) and writes the graph torch's optimizer
    writes; the rule list is restored after the block, also on an error
    and with blocks in two threads; and the block changes nothing where
    onnxscript has no such list or module."""
    import onnx
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    from boat_mm.deploy import onnx_export
    rules = rewriter._DEFAULT_REWRITE_RULES
    assert slice_split_rule in rules
    consulted = []
    try_rewrite = slice_split_rule.try_rewrite
    monkeypatch.setattr(
        slice_split_rule, 'try_rewrite',
        lambda *a, **k: consulted.append(1) or try_rewrite(*a, **k))
    x = _randn(1, (8, 10))

    def export(name):
        consulted.clear()
        path = export_onnx(_Halves(), (8, 10), str(tmp_path / name))
        out = torch.from_numpy(run_onnxruntime(path, x))
        torch.testing.assert_close(out, x[..., :5] * 2 - x[..., 5:])
        graph = onnx.load(path).graph
        return [(n.op_type, list(n.input)) for n in graph.node], len(consulted)

    ours, ours_consulted = export('ours.onnx')
    assert ours_consulted == 0
    assert rewriter._DEFAULT_REWRITE_RULES is rules
    with monkeypatch.context() as m:
        m.setattr(onnx_export, 'linear_time_rewrites', contextlib.nullcontext)
        torchs, torchs_consulted = export('torch.onnx')
    assert torchs_consulted > 0 and ours == torchs
    # Here it cannot fire: torch's aten.slice writes Slices of five inputs
    # (with the steps), and its pattern has four.
    assert [len(inputs) for op, inputs in ours if op == 'Slice'] == [5, 5]

    with onnx_export.linear_time_rewrites():
        inside = rewriter._DEFAULT_REWRITE_RULES
    assert list(inside) == [r for r in rules if r is not slice_split_rule]
    with pytest.raises(RuntimeError, match='inside'):
        with onnx_export.linear_time_rewrites():
            raise RuntimeError('inside')
    assert rewriter._DEFAULT_REWRITE_RULES is rules
    # Another thread's block waits for this one to end, so that the rule
    # is put back after both (without the lock, the second block to end
    # would leave the list without it).
    entered, done = threading.Event(), []

    def other():
        with onnx_export.linear_time_rewrites():
            entered.set()
        done.append(True)

    with onnx_export.linear_time_rewrites():
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.5)
    thread.join(10)
    assert done and rewriter._DEFAULT_REWRITE_RULES is rules

    # Other onnxscript layouts: the block changes nothing.
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'onnxscript.rewriter.rules.common', None)
        with onnx_export.linear_time_rewrites():
            assert rewriter._DEFAULT_REWRITE_RULES is rules
    monkeypatch.delattr(rewriter, '_DEFAULT_REWRITE_RULES')
    with onnx_export.linear_time_rewrites():
        assert not hasattr(rewriter, '_DEFAULT_REWRITE_RULES')
