# Copyright (c) boat-mm contributors. All rights reserved.
"""ONNX export of BOAT: onnxruntime vs PyTorch on the CPU, side by side.

Four measurements, printed as markdown (``docs/deployment.md`` quotes
them):

1. ``latency``: BOAT-CSWin-T + UPerNet (``configs/boat_upernet_ade20k.py``,
   random weights, no auxiliary head) exported at ``--shape`` (512 x 512),
   then batch-1 forward latency of PyTorch (eager, ``torch.no_grad``, the
   default C++ FSLA kernels) and onnxruntime (CPU execution provider, all
   graph optimisations) alternated in one run, with the same number of
   threads; medians. Also the export time, the file size and the
   differences of the outputs on a random and a real image, also with
   PyTorch rerun on onnxruntime's clusters (the file is exported with them
   as extra outputs).
2. ``export``: the export time of ``--export-config`` (BOAT-CSWin-T's
   classifier) at ``--export-shape`` (224 x 224) as the tool exports,
   against the same export with what made it slow put back (onnxscript's
   quadratic ``SlicesSplit`` rule, FSLA's grad-mode and autocast blocks
   that change nothing), one after the other on one seeded model, and
   whether the files hold the same graph and compute the same.
3. ``small``: onnxruntime vs PyTorch on the models the tests export (tiny
   BOAT-Swin / BOAT-CSWin classifiers, the demo segmentor; two input sizes,
   FSLA on and off), each exported with a dynamic batch and run on a
   random batch of 1 and of 3.
4. ``flips``: how often float32 rounding makes onnxruntime rank a near-tie
   of the FSLA clustering the other way: the demo segmentor
   (``configs/demo/``, random weights) at ``--flip-shape``, exported with
   every FSLA layer's clusters as extra outputs
   (:class:`WithClusters`), run on ``--flip-inputs`` random inputs; counts
   the inputs where any cluster differs from PyTorch's and the output
   differences on all inputs.

Example::

    python benchmarks/onnx_export.py         # all
    python benchmarks/onnx_export.py --only export   # ~4 min
    python benchmarks/onnx_export.py --only flips --flip-inputs 200
"""
import argparse
import contextlib
import math
import os
import os.path as osp
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional
from unittest import mock

import torch
from mmengine.config import Config

from boat_mm.deploy import onnx_export as ox
from boat_mm.ops import clustering

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
HEADLINE = osp.join(REPO, 'configs', 'boat_upernet_ade20k.py')
DEMO = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
CSWIN_T = osp.join(REPO, 'configs', 'boat_cswin',
                   'boat-cswin-tiny_8xb256_in1k.py')
# The tiny classifiers of tests/test_tools/test_pytorch2onnx.py.
TINY = {
    'BOAT-Swin':
    (osp.join(REPO, 'configs', 'boat_swin', 'boat-swin-tiny_16xb64_in1k.py'),
     dict(embed_dims=8, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 2])),
    'BOAT-CSWin':
    (osp.join(REPO, 'configs', 'boat_cswin', 'boat-cswin-tiny_8xb256_in1k.py'),
     dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2])),
}


def _against_pytorch(wrapped, got: list, x: torch.Tensor) -> Dict[str, float]:
    """onnxruntime's outputs ``got`` of :class:`WithClusters` against
    PyTorch on ``x``: as is, and PyTorch rerun on onnxruntime's clusters."""
    with torch.no_grad():
        ref = wrapped(x)
        wrapped.inject = [torch.from_numpy(g) for g in got[1:]]
        try:
            again = wrapped(x)
        finally:
            wrapped.inject = None
    layers = len(ref) - 1
    flipped = sum(not torch.equal(torch.from_numpy(g), r)
                  for g, r in zip(got[1:], ref[1:]))
    raw, same = ox.compare(ref[0], got[0]), ox.compare(again[0], got[0])
    return dict(
        layers=layers,
        flipped_layers=flipped,
        rel=raw['rel'],
        argmax=raw['argmax'],
        rel_same_clusters=same['rel'],
        argmax_same_clusters=same['argmax'])


def latency(shape: List[int],
            repeats: int,
            threads: int,
            tmp: str,
            reuse: bool = False,
            extra_inputs: int = 0) -> Dict[str, object]:
    """PyTorch vs onnxruntime latency of the headline segmentor, and the
    differences of its outputs on a random and a real image.

    The file is exported with every FSLA layer's clusters as extra outputs
    (:class:`WithClusters`; the same ops, a few more int64 outputs), so
    that one export (over a minute on two cores) also tells flipped
    near-ties from errors: PyTorch is rerun on onnxruntime's clusters. With
    ``reuse``, a file left in ``tmp`` by an earlier run is used as is (the
    weights are the same: seeded). ``extra_inputs`` more random inputs
    are checked after the timing.
    """
    torch.manual_seed(0)
    model, scope = ox.build_model(Config.fromfile(HEADLINE))
    net = ox.ExportWrapper(model, scope)
    wrapped = ox.WithClusters(net).eval()
    path = osp.join(tmp, 'boat-cswin-tiny_upernet.onnx')
    export_s = float('nan')
    if not (reuse and osp.isfile(path)):
        t0 = time.perf_counter()
        ox.export_onnx(wrapped, shape, path)
        export_s = time.perf_counter() - t0
    sess = ox.make_session(path, threads)
    name = sess.get_inputs()[0].name
    if tuple(sess.get_inputs()[0].shape[2:]) != tuple(shape):
        raise ValueError(f'{path} is not a {shape} export; run without '
                         f'--reuse.')
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    feed = {name: x.numpy()}
    torch.set_num_threads(threads)
    times: Dict[str, List[float]] = {'pytorch': [], 'onnxruntime': []}
    with torch.no_grad():
        net(x)  # warm-up (plans, allocator)
        sess.run(None, feed)
        for _ in range(repeats):
            t = time.perf_counter()
            net(x)
            times['pytorch'].append(time.perf_counter() - t)
            t = time.perf_counter()
            sess.run(None, feed)
            times['onnxruntime'].append(time.perf_counter() - t)
    checks = {'random': _against_pytorch(wrapped, sess.run(None, feed), x)}
    with tempfile.TemporaryDirectory(dir=tmp) as data:
        image = ox._generated_image(scope, data)
        x = ox.load_image(image, model, shape)
    checks['image'] = _against_pytorch(wrapped,
                                       sess.run(None, {name: x.numpy()}), x)
    gen = torch.Generator().manual_seed(1)
    for i in range(extra_inputs):
        x = torch.randn(1, 3, *shape, generator=gen)
        checks[f'random {i + 2}'] = _against_pytorch(
            wrapped, sess.run(None, {name: x.numpy()}), x)
    return dict(
        export_s=export_s,
        size_mib=osp.getsize(path) / 2**20,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        pytorch_s=statistics.median(times['pytorch']),
        onnxruntime_s=statistics.median(times['onnxruntime']),
        checks=checks)


def _without_metadata(graph):
    """The graph without its nodes' metadata (the exporter's stack traces
    name FX's generated modules by a per-process counter)."""
    graph = type(graph).FromString(graph.SerializeToString())
    for node in graph.node:
        node.ClearField('metadata_props')
        node.ClearField('doc_string')
    return graph


# What export_time compares: before this stop's two fixes, with the
# first, and the tool as it is. Each fix is undone by restoring what it
# replaced: torch's full rule list, and FSLA's grad-mode and autocast
# blocks entered whether or not they change anything.
EXPORTS = {
    'before': "torch's optimizer, FSLA's blocks always entered",
    'rules': "without SlicesSplit, FSLA's blocks always entered",
    'tool': 'without SlicesSplit, blocks only where needed (the tool)',
}


def _export_as(name: str) -> contextlib.ExitStack:
    """The patches that make ``export_onnx`` export as ``EXPORTS[name]``."""
    stack = contextlib.ExitStack()
    if name == 'before':
        stack.enter_context(
            mock.patch.object(ox, 'linear_time_rewrites',
                              contextlib.nullcontext))
    if name in ('before', 'rules'):
        stack.enter_context(
            mock.patch.object(clustering, '_no_grad', torch.no_grad))
        stack.enter_context(
            mock.patch.object(clustering, '_float32',
                              lambda d: torch.autocast(d, enabled=False)))
    return stack


def export_time(config: str, shape: List[int], threads: int,
                tmp: str) -> Dict[str, Dict[str, object]]:
    """Export time of one seeded model as in :data:`EXPORTS` (the graph
    optimizer without its quadratic rule: :func:`~boat_mm.deploy.
    onnx_export.linear_time_rewrites`; no grad-mode or autocast block in
    FSLA that changes nothing, each of which torch.export splits out and
    inlines back), one after the other; then whether the files hold the
    graph of the first (nodes, weights, inputs and outputs), and the
    largest difference of their onnxruntime outputs on one random
    input."""
    import onnx
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, scope = ox.build_model(Config.fromfile(config))
    net = ox.ExportWrapper(model, scope)
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    # Untimed: the first export in a process also pays one-time costs
    # (imports, onnxscript's function library), a few seconds.
    ox.export_onnx(net, (32, 32), osp.join(tmp, 'warm-up.onnx'))
    rows: Dict[str, Dict[str, object]] = {}
    for name in EXPORTS:
        path = osp.join(tmp, f'export_{name}.onnx')
        with _export_as(name):
            t0 = time.perf_counter()
            ox.export_onnx(net, shape, path)
        rows[name] = dict(
            export_s=time.perf_counter() - t0,
            graph=onnx.load(path).graph,
            size_mib=osp.getsize(path) / 2**20,
            out=ox.run_onnxruntime(path, x, ox.make_session(path, threads)))
    first = rows['before']
    reference = _without_metadata(first['graph'])
    for r in rows.values():
        r['nodes'] = len(r['graph'].node)
        r['same_graph'] = _without_metadata(r['graph']) == reference
        r['max_abs_diff'] = float(abs(r['out'] - first['out']).max())
    return rows


def small(threads: int, tmp: str) -> List[Dict[str, object]]:
    """onnxruntime vs PyTorch on the tiny classifiers and the demo
    segmentor, dynamic batch, batches of 1 and 3."""
    cases = []
    for name, (config, arch) in TINY.items():
        for fsla in (True, False):
            cfg = Config.fromfile(config)
            backbone = dict(
                arch=dict(_delete_=True, **arch),
                drop_path_rate=0.,
                with_fsla=fsla,
                fsla_cfg=dict(group_size=16, overlap=4))
            cfg.merge_from_dict(
                dict(
                    model=dict(
                        backbone=backbone,
                        head=dict(in_channels=64, num_classes=6))))
            cases += [(f'tiny {name} classifier', cfg, fsla, shape)
                      for shape in [(64, 64), (72, 52)]]
    for fsla in (True, False):
        cfg = Config.fromfile(DEMO)
        cfg.merge_from_dict({'model.backbone.with_fsla': fsla})
        cases += [('demo segmentor', cfg, fsla, shape)
                  for shape in [(128, 128), (100, 76)]]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, cfg, fsla, shape in cases:
        torch.manual_seed(0)
        model, scope = ox.build_model(cfg)
        wrapped = ox.WithClusters(ox.ExportWrapper(model, scope)).eval()
        path = osp.join(tmp, 'small.onnx')
        ox.export_onnx(wrapped, shape, path, dynamic=('batch', ))
        sess = ox.make_session(path, threads)
        for batch in (1, 3):
            x = torch.randn(batch, 3, *shape, generator=gen)
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            rows.append(
                dict(
                    model=name,
                    fsla=fsla,
                    shape=shape,
                    batch=batch,
                    **_against_pytorch(wrapped, got, x)))
    return rows


def flips(shape: List[int], inputs: int, threads: int,
          tmp: str) -> Dict[str, float]:
    """How often onnxruntime's clusters differ from PyTorch's."""
    torch.manual_seed(0)
    model, scope = ox.build_model(Config.fromfile(DEMO))
    wrapped = ox.WithClusters(ox.ExportWrapper(model, scope)).eval()
    path = osp.join(tmp, 'demo_clusters.onnx')
    ox.export_onnx(wrapped, shape, path)
    sess = ox.make_session(path, threads)
    name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(0)
    flipped_inputs = flipped_layers = layers = 0
    worst_rel, worst_pixels, worst_rel_same = 0., 1., 0.
    for _ in range(inputs):
        x = torch.randn(1, 3, *shape, generator=gen)
        got = sess.run(None, {name: x.numpy()})
        with torch.no_grad():
            ref = wrapped(x)
        layers = len(ref) - 1
        n = sum(not torch.equal(torch.from_numpy(g), r)
                for g, r in zip(got[1:], ref[1:]))
        d = ox.compare(ref[0], got[0])
        flipped_inputs += n > 0
        flipped_layers += n
        worst_rel = max(worst_rel, d['rel'])
        worst_pixels = min(worst_pixels, d['argmax'])
        if n == 0:
            worst_rel_same = max(worst_rel_same, d['rel'])
    return dict(
        inputs=inputs,
        layers=layers,
        flipped_inputs=flipped_inputs,
        flipped_layers=flipped_layers,
        worst_rel=worst_rel,
        worst_rel_same_clusters=worst_rel_same,
        worst_pixels=worst_pixels,
        size_mib=osp.getsize(path) / 2**20)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--only', choices=['latency', 'export', 'small', 'flips'])
    parser.add_argument('--shape', type=int, nargs=2, default=[512, 512])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--flip-shape', type=int, nargs=2, default=[128, 128])
    parser.add_argument(
        '--export-config',
        default=CSWIN_T,
        help='export: the config whose export is timed')
    parser.add_argument(
        '--export-shape', type=int, nargs=2, default=[224, 224])
    parser.add_argument('--flip-inputs', type=int, default=100)
    parser.add_argument(
        '--work-dir',
        help='keep the exported files here (a temporary folder without)')
    parser.add_argument(
        '--extra-inputs',
        type=int,
        default=0,
        help='latency: check this many more random inputs')
    parser.add_argument(
        '--reuse',
        action='store_true',
        help='latency: use the file an earlier run left in --work-dir')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.work_dir:
            os.makedirs(args.work_dir, exist_ok=True)
            tmp = args.work_dir
        if args.only in (None, 'latency'):
            r = latency(args.shape, args.repeats, args.threads, tmp,
                        args.reuse, args.extra_inputs)
            H, W = args.shape
            print(f'\n### BOAT-CSWin-T + UPerNet, 1x3x{H}x{W}, '
                  f'{args.threads} threads, median of {args.repeats}\n')
            print('| runtime | latency (s) | vs PyTorch |')
            print('|---|---|---|')
            print(f'| PyTorch {torch.__version__} eager (C++ FSLA '
                  f'kernels) | {r["pytorch_s"]:.3f} | 1.00x |')
            import onnxruntime
            print(f'| onnxruntime {onnxruntime.__version__} CPU | '
                  f'{r["onnxruntime_s"]:.3f} | '
                  f'{r["onnxruntime_s"] / r["pytorch_s"]:.2f}x |')
            took = 'reused, not timed' if math.isnan(r['export_s']) \
                else f'{r["export_s"]:.0f} s'
            print(f'\nexport {took}, file '
                  f'{r["size_mib"]:.1f} MiB ({r["params_m"]:.1f} M params '
                  f'without the auxiliary head)\n')
            print('| input | clustered FSLA calls with other clusters | '
                  'relative diff | equal pixels | same clusters: relative '
                  'diff | same clusters: equal pixels |')
            print('|---|---|---|---|---|---|')
            for name, c in r['checks'].items():
                print(f'| {name} | {c["flipped_layers"]} / {c["layers"]} | '
                      f'{c["rel"]:.3g} | {100 * c["argmax"]:.3f} % | '
                      f'{c["rel_same_clusters"]:.3g} | '
                      f'{100 * c["argmax_same_clusters"]:.3f} % |')
        if args.only in (None, 'export'):
            rows = export_time(args.export_config, args.export_shape,
                               args.threads, tmp)
            H, W = args.export_shape
            print(f'\n### Export of {osp.basename(args.export_config)}, '
                  f'1x3x{H}x{W}, {args.threads} threads\n')
            print('| export | time (s) | vs before | nodes | file (MiB) | '
                  'graph as before | max abs diff of the outputs |')
            print('|---|---|---|---|---|---|---|')
            for name, label in EXPORTS.items():
                r = rows[name]
                print(f'| {label} | {r["export_s"]:.0f} | '
                      f'{rows["before"]["export_s"] / r["export_s"]:.1f}x | '
                      f'{r["nodes"]} | {r["size_mib"]:.1f} | '
                      f'{"same" if r["same_graph"] else "other"} | '
                      f'{r["max_abs_diff"]:.3g} |')
        if args.only in (None, 'small'):
            rows = small(args.threads, tmp)
            print('\n### Small models, dynamic batch, random inputs\n')
            print('| model | FSLA | input | clustered FSLA calls with other '
                  'clusters | relative diff | equal classes | same clusters: '
                  'relative diff |')
            print('|---|---|---|---|---|---|---|')
            for r in rows:
                H, W = r['shape']
                print(f'| {r["model"]} | {"on" if r["fsla"] else "off"} | '
                      f'{r["batch"]}x3x{H}x{W} | {r["flipped_layers"]} / '
                      f'{r["layers"]} | {r["rel"]:.2g} | '
                      f'{100 * r["argmax"]:.2f} % | '
                      f'{r["rel_same_clusters"]:.2g} |')
        if args.only in (None, 'flips'):
            r = flips(args.flip_shape, args.flip_inputs, args.threads, tmp)
            H, W = args.flip_shape
            print(f'\n### Near-tie flips: demo segmentor, 1x3x{H}x{W}, '
                  f'{r["inputs"]} random inputs, {r["layers"]} clustered '
                  f'FSLA layers\n')
            print(f'- inputs with any cluster different from PyTorch: '
                  f'{r["flipped_inputs"]} / {r["inputs"]} '
                  f'({r["flipped_layers"]} layer outputs of '
                  f'{r["inputs"] * r["layers"]})')
            print(f'- worst relative logit difference: '
                  f'{r["worst_rel"]:.3g} (inputs with equal clusters: '
                  f'{r["worst_rel_same_clusters"]:.3g})')
            print(f'- worst share of pixels with equal class: '
                  f'{100 * r["worst_pixels"]:.3f} %')
    return 0


if __name__ == '__main__':
    sys.exit(main())
