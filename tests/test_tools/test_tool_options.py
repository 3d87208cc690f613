# Copyright (c) boat-mm contributors. All rights reserved.
"""Every option of the analysis, visualisation, deployment, conversion and
data tools, and of the demo, has an effect.

The tools run in-process (``main(argv)``, or ``main()`` with ``sys.argv``
for the tools that read it) on tiny models. Where an option's effect needs
what this machine lacks (the public BOAT code for verify_boat.py and
check_fsla_parity.py, the demo's minutes of training), the expensive call
is replaced by a recorder and the test checks what the tool passed to it
and what it made of the answer. See test_runner_tool_options.py for
tools/train.py and tools/test.py.
"""
import os
import os.path as osp
import re
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from repo_scripts import REPO, load_script
from tiny_configs import cswin_classifier, swin_classifier

TOOLS = osp.join(REPO, 'tools')
SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_16xb64_in1k.py')
CSWIN_T = osp.join(REPO, 'configs', 'boat_cswin',
                   'boat-cswin-tiny_8xb256_in1k.py')


@pytest.fixture(scope='module')
def tiny_swin(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp('opts') / 'tiny_swin.py'
    path.write_text(swin_classifier(SWIN_T))
    return str(path)


# ------------------------------------------------------------ get_flops.py


@pytest.fixture(scope='module')
def get_flops():
    return load_script('tools/analysis_tools/get_flops.py')


@pytest.fixture
def counted(get_flops, monkeypatch):
    """Records the keyword arguments and results of the tool's complexity
    counter (the real one runs)."""
    calls = []
    real = get_flops.get_model_complexity

    def spy(model, **kwargs):
        info = real(model, **kwargs)
        calls.append((kwargs, info))
        return info

    monkeypatch.setattr(get_flops, 'get_model_complexity', spy)
    return calls


def test_get_flops_masked_attention(get_flops, tiny_swin, counted):
    for mode in ('allowed', 'dense'):
        assert get_flops.main(
            [tiny_swin, '--shape', '64', '--masked-attention', mode]) == 0
    (allowed, a), (dense, d) = counted
    assert allowed['masked_attention'] == 'allowed'
    assert dense['masked_attention'] == 'dense'
    # Masked (shifted-window, FSLA) attention costs more counted densely;
    # nothing else changes.
    assert d['by_operator']['sdpa'] > a['by_operator']['sdpa']
    assert d['macs'] - a['macs'] == pytest.approx(d['by_operator']['sdpa'] -
                                                  a['by_operator']['sdpa'])


def test_get_flops_cfg_options(get_flops, tiny_swin, counted):
    assert get_flops.main([tiny_swin, '--shape', '32']) == 0
    assert get_flops.main([
        tiny_swin, '--shape', '32', '--cfg-options',
        'model.head.num_classes=10'
    ]) == 0
    six, ten = counted[0][1], counted[1][1]
    assert ten['params'] - six['params'] == 4 * (64 + 1)  # 4 more classes


def test_get_flops_show_table_and_arch(get_flops, tiny_swin, capsys):
    assert get_flops.main([tiny_swin, '--shape', '32']) == 0
    plain = capsys.readouterr().out
    assert get_flops.main([tiny_swin, '--shape', '32', '--show-table']) == 0
    table = capsys.readouterr().out
    assert get_flops.main([tiny_swin, '--shape', '32', '--show-arch']) == 0
    arch = capsys.readouterr().out
    # mmengine's per-module table: a row per module down to the stages.
    assert '#flops' not in plain and '| module' in table
    assert '|    backbone.stages.0 ' in table
    assert 'backbone.stages.0' not in plain + arch
    # The model printed with its per-module complexity.
    assert '(backbone): BOATSwin(' in arch and '#params: ' in arch
    assert 'BOATSwin(' not in plain + table
    for out in (plain, table, arch):  # and the summary
        assert re.search(r'^Params \(M\)\s+0\.10$', out, re.M)


def test_get_flops_check_reference_and_tolerance(get_flops, monkeypatch,
                                                 tmp_path, capsys):
    """--check-reference compares each published model's count with its
    published numbers, within --tolerance on multiply-adds; the counter is
    replaced (the real check takes minutes; test_parity_tools.py)."""
    rel = 'configs/boat_swin/boat-swin-tiny_16xb64_in1k.py'
    published = SimpleNamespace(published_params=28.2e6, published_flops=4e9)
    monkeypatch.setattr(get_flops, 'published_complexity',
                        lambda: {rel: published})
    counts = []

    def count(config, shape, cfg_options=None, masked_attention='allowed'):
        counts.append((config, shape, masked_attention))
        return dict(
            params=28.2e6,
            macs=4.08e9,
            flops=4.1e9,
            by_operator=dict(sdpa=1e8, fsla_clustering=1e7))

    monkeypatch.setattr(get_flops, 'count_config', count)
    assert get_flops.main(['--check-reference']) == 0  # 2 % < 3 %
    assert counts == [(osp.join(get_flops.REPO_ROOT,
                                rel), (224, 224), 'allowed')]
    assert ' yes' in capsys.readouterr().out
    assert get_flops.main(['--check-reference', '--tolerance', '0.01']) == 1
    out = capsys.readouterr().out
    assert ' NO' in out and ' yes' not in out and 'Tolerance 1%' in out
    assert get_flops.main([
        '--check-reference', '--tolerance', '0.021', '--masked-attention',
        'dense'
    ]) == 0
    assert counts[-1][2] == 'dense'
    published.published_params = 28.3e6  # params must match to 0.01M
    assert get_flops.main(['--check-reference', '--tolerance', '0.5']) == 1


# --------------------------------------------------------- vis_clusters.py


@pytest.fixture(scope='module')
def vis():
    return load_script('tools/visualization/vis_clusters.py')


def test_vis_clusters_block_head_device(vis, tmp_path, monkeypatch):
    """--block and --head choose the FSLA module and head whose clusters
    are drawn; --device is where the model runs."""
    from boat_mm.visualization import capture_cluster_ids
    cfg_file = tmp_path / 'tiny_cswin.py'
    # BOAT-CSWin-T's recipe with FSLA in blocks 0 and 2 of stage 0, 2 heads.
    cfg_file.write_text(cswin_classifier(CSWIN_T, stage0_depth=3))
    torch.manual_seed(0)
    model = vis.build_model(Config.fromfile(str(cfg_file)))
    ckpt = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    image = str(tmp_path / 'img.png')
    cv2.imwrite(image, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))

    devices = []
    build = vis.build_model
    monkeypatch.setattr(
        vis,
        'build_model',
        lambda cfg, checkpoint=None, device='cpu': devices.append(device) or
        build(cfg, checkpoint, device))
    common = [
        str(cfg_file), image, '--checkpoint', ckpt, '--resize', '64', '64',
        '--device', 'cpu:0'
    ]
    got = {}
    for block, head in [(0, 0), (2, 0), (2, 1)]:
        res = vis.main(common + [
            '--block',
            str(block), '--head',
            str(head), '--out-file',
            str(tmp_path / f'{block}{head}.png')
        ])
        assert res['location'] == (0, block)
        got[block, head] = res['ids']
    assert devices == ['cpu:0'] * 3
    # What the tool drew against the clusters captured here.
    x = model.data_preprocessor(
        dict(inputs=[torch.from_numpy(res['image']).permute(2, 0, 1)]),
        False)['inputs']
    ids = capture_cluster_ids(model, x, [(0, 0), (0, 2)])
    for (block, head), value in got.items():
        np.testing.assert_array_equal(value, ids[0, block][0, head].numpy())
    # The three choices draw three different clusterings.
    assert not np.array_equal(got[0, 0], got[2, 0])
    assert not np.array_equal(got[2, 0], got[2, 1])


# -------------------------------------------------------- pytorch2onnx.py


@pytest.fixture(scope='module')
def p2o():
    return load_script('tools/deployment/pytorch2onnx.py')


def test_onnx_opset_image_cfg_options_verify(p2o, tmp_path, monkeypatch,
                                             capsys):
    """--opset is the file's opset; --cfg-options reach the model; --verify
    runs onnxruntime on each input it names, --image being the first."""
    import onnx
    cfg = tmp_path / 'swin.py'
    cfg.write_text(swin_classifier(SWIN_T, with_fsla=False))
    image = str(tmp_path / 'img.png')
    rng = np.random.default_rng(1)
    cv2.imwrite(image, rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    from boat_mm.deploy import onnx_export
    fed = []
    make_session = onnx_export.make_session

    def session_spy(path, threads=None):
        session = make_session(path, threads)
        run = session.run

        class Session:
            get_inputs = session.get_inputs

            def run(self, names, feeds):
                fed.append(next(iter(feeds.values())))
                return run(names, feeds)

        return Session()

    monkeypatch.setattr(onnx_export, 'make_session', session_spy)
    out = str(tmp_path / 'swin.onnx')
    assert p2o.main([
        str(cfg), '--shape', '32', '48', '--out', out, '--opset', '19',
        '--verify', '--image', image, '--cfg-options',
        'model.head.num_classes=5'
    ]) == 0
    model = onnx.load(out)
    assert {o.domain: o.version for o in model.opset_import}[''] == 19
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 5]
    text = capsys.readouterr().out
    assert 'image input' in text and 'random input' in text
    assert 'batch 3' not in text  # a fixed batch: no batch-3 run
    assert [f.shape for f in fed] == [(1, 3, 32, 48)] * 2
    net = onnx_export.build_model(Config.fromfile(str(cfg)))[0]
    expected = onnx_export.load_image(image, net, (32, 48))
    np.testing.assert_allclose(fed[0], expected.numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(fed[1], fed[0])


# ---------------------------------------------------------- verify_boat.py


@pytest.fixture(scope='module')
def verify_boat():
    return load_script('tools/model_converters/verify_boat.py')


class _VerifySpy:
    """Replaces verify_boat's access to the public code and its
    comparison: records what main asks for and answers ``diffs`` (by
    dtype) as the comparison's differences."""

    def __init__(self, tool, monkeypatch, diffs) -> None:
        self.imports, self.built, self.loaded, self.compared = [], [], [], []
        self.diffs = diffs
        monkeypatch.setattr(
            tool, 'import_public_module',
            lambda repo, family: self.imports.append(
                (repo, family)) or 'public-module')
        monkeypatch.setattr(tool, 'build_reference', self.build)
        monkeypatch.setattr(tool, 'verify', self.verify)

    def build(self, module, family, arch):
        assert module == 'public-module'
        family = getattr(family, 'family', family)
        self.built.append((family, arch, torch.rand(1).item()))
        ref = torch.nn.Linear(1, 1)
        ref.load_state_dict = lambda state, strict=True: self.loaded.append(
            state)
        return ref

    def verify(self, family, ref, batches=(1, 2), seed=0, dtype=torch.float32):
        self.compared.append((family.family, seed, dtype))
        return {'logits b1': self.diffs[dtype], 'logits b2': 0.}


def test_verify_boat_random_weights_options(verify_boat, monkeypatch, capsys):
    f32, f64 = torch.float32, torch.float64
    spy = _VerifySpy(verify_boat, monkeypatch, {f32: 5e-5, f64: 1e-9})
    assert verify_boat.main([
        '--ref-repo', '/x/boat', '--family', 'cswin', '--arch', 'tiny',
        'small', '--seed', '3'
    ]) == 0
    assert spy.imports == [('/x/boat', 'cswin')]
    assert [b[:2] for b in spy.built] == [('cswin', 'tiny'),
                                          ('cswin', 'small')]
    assert spy.compared == [('cswin', 3, f32)] * 2
    assert 'PASS' in capsys.readouterr().out
    # --seed seeds the random reference weights (seed + i per arch).
    spy2 = _VerifySpy(verify_boat, monkeypatch, spy.diffs)
    verify_boat.main(['--ref-repo', 'r', '--family', 'swin', '--seed', '3'])
    verify_boat.main(['--ref-repo', 'r', '--family', 'swin', '--seed', '4'])
    assert spy2.built[0][2] == spy.built[0][2]  # seed 3, first arch
    assert spy2.built[1][2] == spy.built[1][2]  # seed 4 = 3 + 1
    assert spy2.built[0][2] != spy2.built[1][2]
    # --tol: 5e-5 fails 1e-5 in float32, float64 (1e-9) then passes.
    spy = _VerifySpy(verify_boat, monkeypatch, {f32: 5e-5, f64: 1e-9})
    assert verify_boat.main(
        ['--ref-repo', 'r', '--family', 'swin', '--tol', '1e-5']) == 0
    assert [c[2] for c in spy.compared] == [f32, f64]
    spy.diffs = {f32: 5e-5, f64: 2e-5}
    assert verify_boat.main(
        ['--ref-repo', 'r', '--family', 'swin', '--tol', '1e-5']) == 1
    assert 'FAIL' in capsys.readouterr().out
    # --double: float64 only, and no float32 fallback to pass on.
    spy = _VerifySpy(verify_boat, monkeypatch, {f32: 0., f64: 2e-4})
    assert verify_boat.main(
        ['--ref-repo', 'r', '--family', 'swin', '--double']) == 1
    assert [c[2] for c in spy.compared] == [f64]


@pytest.fixture(scope='module')
def cswin_published_file(tmp_path_factory):
    """A published-layout BOAT-CSWin-T file (published_files.py's
    layout): tensor ``i`` holds ``i`` in ``state_dict`` and
    ``i + 0.5`` in ``state_dict_ema``."""
    from published_files import classifier, cswin_to_original
    model = classifier(dict(type='BOATCSWin', arch='tiny'), 11, 512)
    shapes = {k: v.shape for k, v in model.state_dict().items()}

    def layout(offset):
        return cswin_to_original(
            OrderedDict((k, torch.tensor(i + offset).expand(s))
                        for i, (k, s) in enumerate(shapes.items())))

    path = str(tmp_path_factory.mktemp('verify') / 'cswin.pth.tar')
    torch.save(dict(state_dict=layout(0.), state_dict_ema=layout(0.5)), path)
    return path


@pytest.mark.parametrize('ema', [False, True])
def test_verify_boat_checkpoint_and_ema(verify_boat, monkeypatch,
                                        cswin_published_file, ema):
    spy = _VerifySpy(verify_boat, monkeypatch, {torch.float32: 0.})
    argv = [cswin_published_file, '--ref-repo', 'r'] + ['--ema'] * ema
    assert verify_boat.main(argv) == 0
    assert spy.imports == [('r', 'cswin')]
    assert [b[:2] for b in spy.built] == [('cswin', 'tiny')]
    (state, ) = spy.loaded
    values = {float(v.flatten()[0]) % 1 for v in state.values()}
    assert values == {0.5 if ema else 0.}


def test_verify_boat_verify_measures_disagreement(verify_boat):
    """The comparison itself, on a stand-in for the public model (ours with
    the published key layout): zero when both compute alike, the size of
    a difference put into the stand-in's logits otherwise."""
    from boat_mm.models.backbones import BOATSwin
    swin_tests = load_script(
        'tests/test_models/test_backbones/test_boat_swin.py')
    arch = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
    info = dict(
        backbone=dict(arch=arch, with_fsla=True),
        num_classes=5,
        in_channels=64)

    class Public(torch.nn.Module):
        """Also shows its stage tokens where the public Swin does: as the
        output of the last block of each ``layers[i]``."""

        def __init__(self, shift: float) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inner = verify_boat.build_classifier(BOATSwin, info).eval()
            self.shift = shift
            self.layers = torch.nn.ModuleList(torch.nn.Module()
                                              for _ in range(4))
            for layer in self.layers:
                layer.blocks = torch.nn.ModuleList([torch.nn.Identity()])

        def state_dict(self, *args, **kwargs):
            return swin_tests.to_original(self.inner.state_dict())

        def forward(self, x):
            feats = self.inner.backbone.forward_stages(x)
            for layer, feat in zip(self.layers, feats):
                layer.blocks[-1](feat.flatten(2).transpose(1, 2))
            out = self.inner(x, mode='tensor')
            out[0, 0] += self.shift
            return out

    names = {
        f'{o} b{b}'
        for o in ('stage1', 'stage2', 'stage3', 'stage4', 'logits')
        for b in (1, 2)
    }
    same = verify_boat.verify(BOATSwin, Public(0.), batches=(1, 2))
    assert set(same) == names
    assert max(same.values()) < 1e-5
    off = verify_boat.verify(BOATSwin, Public(0.25), batches=(1, 2))
    assert off['logits b1'] == pytest.approx(0.25, abs=1e-5)
    assert off['logits b2'] == pytest.approx(0.25, abs=1e-5)
    assert max(off[f'stage{i} b{b}'] for i in range(1, 5)
               for b in (1, 2)) < 1e-5


# ---------------------------------------------------- check_fsla_parity.py


@pytest.fixture(scope='module')
def parity():
    return load_script('tools/analysis_tools/check_fsla_parity.py')


def _run_parity(parity, monkeypatch, argv, answer):
    """main() with ``argv``; the public class and the comparison replaced:
    ``answer(dtype)`` gives ``(max diff, max output, share off)``."""
    calls = []
    monkeypatch.setattr(parity, 'load_content_attention', lambda repo, family:
                        (repo, family))
    monkeypatch.setattr(
        parity, 'compare', lambda ref_cls, side, dims, heads, our_scale,
        ref_scale, dtype, batch, seed: calls.append(
            (ref_cls, side, dtype, batch, seed)) or answer(dtype))
    monkeypatch.setattr(sys, 'argv', ['check_fsla_parity.py'] + argv)
    try:
        parity.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return calls, code


def test_check_fsla_parity_options(parity, monkeypatch, capsys):
    ok = lambda dtype: (0., 1., 0.)  # noqa: E731
    calls, code = _run_parity(parity, monkeypatch, ['--ref-repo', 'R'], ok)
    capsys.readouterr()
    assert code == 0 and len(calls) == 12
    assert {c[0] for c in calls} == {('R', 'swin'), ('R', 'cswin')}
    assert [c[1] for c in calls[:6:2]] == [56, 28, 14]
    assert {c[3:] for c in calls} == {(2, 0)}  # default batch and seed
    calls, code = _run_parity(parity, monkeypatch, [
        '--ref-repo', 'R', '--family', 'cswin', '--dtype', 'float64',
        '--batch', '3', '--seed', '7'
    ], ok)
    assert code == 0
    assert [(c[0][1], c[2], c[3], c[4]) for c in calls] == \
        [('cswin', torch.float64, 3, 7)] * 3
    out = capsys.readouterr().out
    assert '| cswin |' in out and '| swin |' not in out
    for bad in (['--family', 'vit'], ['--dtype', 'int8']):
        assert _run_parity(parity, monkeypatch, ['--ref-repo', 'R'] + bad,
                           ok)[1] not in (0, None)


def test_check_fsla_parity_atol_and_max_off(parity, monkeypatch):
    f32 = ['--ref-repo', 'R', '--dtype', 'float32', '--family', 'swin']
    f64 = ['--ref-repo', 'R', '--dtype', 'float64', '--family', 'swin']

    def answer(diff, far):
        return lambda dtype: (diff, 1., far)

    run = lambda argv, a: _run_parity(parity, monkeypatch, argv, a)[1]  # noqa
    # float32: within --atol, or few tokens beyond it (--max-off).
    assert run(f32, answer(5e-5, 0.5)) == 0
    assert run(f32, answer(5e-4, 0.01)) == 0
    assert run(f32, answer(5e-4, 0.05)) == 1
    assert run(f32 + ['--max-off', '0.1'], answer(5e-4, 0.05)) == 0
    assert run(f32 + ['--atol', '1e-3'], answer(5e-4, 0.05)) == 0
    # float64: atol * 1e-4, no share of tokens allowed.
    assert run(f64, answer(5e-9, 1.)) == 0
    assert run(f64, answer(5e-8, 0.)) == 1
    assert run(f64 + ['--atol', '1e-3'], answer(5e-8, 0.)) == 0


def test_check_fsla_parity_compare_measures_disagreement(parity):
    """The comparison on a stand-in for the public ContentAttention (our
    FSLA, with a difference put into some tokens): the share of tokens off
    is the share changed, the max difference the change."""
    from boat_mm.models.utils import FeatureSpaceLocalAttention

    def stand_in(changed):

        class Public(FeatureSpaceLocalAttention):

            def __init__(self, dims, window_size, num_heads, qkv_bias,
                         qk_scale):
                super().__init__(dims, num_heads, qk_scale=qk_scale)

            def forward(self, x):
                side = int(x.shape[1]**0.5)
                out = super().forward(x, (side, side))
                out[:, :changed] += 0.5
                return out

        return Public

    side, tokens = 8, 64
    diff, scale, far = parity.compare(
        stand_in(0), side, 16, 2, None, None, torch.float64, 2, 0)
    assert diff < 1e-12 and far == 0 and scale > 0
    diff, _, far = parity.compare(
        stand_in(16), side, 16, 2, None, None, torch.float64, 2, 0)
    assert diff == pytest.approx(0.5) and far == 16 / tokens


# ------------------------------------------------- gen_synthetic_data.py


@pytest.fixture(scope='module')
def gen_tool():
    return load_script('tools/dataset_converters/gen_synthetic_data.py')


def _generate(gen_tool, monkeypatch, *argv):
    monkeypatch.setattr(sys, 'argv', ['gen_synthetic_data.py', *argv])
    gen_tool.main()


def _files(folder, ext):
    return sorted(
        osp.relpath(osp.join(d, f), folder) for d, _, fs in os.walk(folder)
        for f in fs if f.endswith(ext))


def test_gen_synthetic_ade20k_options(gen_tool, monkeypatch, tmp_path):
    args = ['--num-train', '3', '--num-val', '2', '--img-size', '40']
    _generate(gen_tool, monkeypatch, 'ade20k', str(tmp_path / 'a'), *args,
              '--num-classes', '5')
    root = str(tmp_path / 'a' / 'ADEChallengeData2016')
    assert len(_files(osp.join(root, 'images', 'training'), '.jpg')) == 3
    labels = [
        cv2.imread(
            osp.join(root, 'annotations', 'validation', f),
            cv2.IMREAD_UNCHANGED)
        for f in _files(osp.join(root, 'annotations', 'validation'), '.png')
    ]
    assert len(labels) == 2 and all(lb.shape == (40, 40) for lb in labels)
    assert max(int(lb.max()) for lb in labels) <= 5
    # --seed: the same seed writes the same bytes, another seed others.
    _generate(gen_tool, monkeypatch, 'ade20k', str(tmp_path / 'b'), *args,
              '--num-classes', '5', '--seed', '0')
    _generate(gen_tool, monkeypatch, 'ade20k', str(tmp_path / 'c'), *args,
              '--num-classes', '5', '--seed', '1')
    name = osp.join('ADEChallengeData2016', 'images', 'training',
                    'ADE_train_00000000.jpg')
    a, b, c = [(tmp_path / s / name).read_bytes() for s in 'abc']
    assert a == b and a != c


def test_gen_synthetic_imagenet_and_coco_options(gen_tool, monkeypatch,
                                                 tmp_path):
    import json
    _generate(gen_tool, monkeypatch, 'imagenet', str(tmp_path / 'in'),
              '--num-train', '2', '--num-val', '1', '--img-size', '24',
              '--num-classes', '5')
    train = _files(str(tmp_path / 'in' / 'train'), '.JPEG')
    assert len(train) == 5 * 2 and len({osp.dirname(f) for f in train}) == 5
    assert len(_files(str(tmp_path / 'in' / 'val'), '.JPEG')) == 5
    img = cv2.imread(str(tmp_path / 'in' / 'train' / train[0]))
    assert img.shape == (24, 24, 3)
    _generate(gen_tool, monkeypatch, 'coco', str(tmp_path / 'coco'),
              '--num-train', '2', '--num-val', '1', '--img-size', '64',
              '--num-classes', '7')
    with open(tmp_path / 'coco' / 'annotations' /
              'instances_val2017.json') as f:
        val = json.load(f)
    assert len(val['images']) == 1
    assert (val['images'][0]['height'], val['images'][0]['width']) == (64, 64)
    assert len(val['categories']) == 7
    assert len(_files(str(tmp_path / 'coco' / 'train2017'), '.jpg')) == 2


# ------------------------------------------------------ run_demo.py, demo.sh


@pytest.fixture
def demo(monkeypatch, tmp_path):
    """run_demo.py with its commands, the dataset generator and the
    picture recorded; a data folder with one validation label map."""
    tool = load_script('tools/run_demo.py')
    rec = SimpleNamespace(cmds=[], generated=[], montage=[], miou=50.)

    def run(cmd, log_file=None):
        rec.cmds.append(cmd)
        work_dir = cmd[cmd.index('--work-dir') + 1]
        if cmd[1] == 'tools/train.py':
            os.makedirs(work_dir, exist_ok=True)
            open(osp.join(work_dir, 'iter_7.pth'), 'w').close()
        return (f'Iter(test) [1/1]    aAcc: 80.0000  mIoU: {rec.miou}  '
                'mAcc: 1.0')

    def generate(out_dir, **kwargs):
        rec.generated.append((out_dir, kwargs))
        root = osp.join(out_dir, 'ADEChallengeData2016')
        os.makedirs(osp.join(root, 'images', 'training'))
        open(osp.join(root, 'images', 'training', 'x.jpg'), 'w').close()
        ann = osp.join(root, 'annotations', 'validation')
        os.makedirs(ann)
        label = np.ones((4, 4), np.uint8)
        label[:, 2:] = 2  # two classes, 8 pixels each: chance 100/3 %
        cv2.imwrite(osp.join(ann, 'a.png'), label)
        return root

    import boat_mm.datasets
    monkeypatch.setattr(boat_mm.datasets, 'generate_ade20k_like', generate)
    monkeypatch.setattr(tool, '_run', run)
    monkeypatch.setattr(tool, 'draw_montage',
                        lambda *args: rec.montage.append(args))
    rec.main = tool.main
    return rec


def _option(cmd, name):
    return [c for c in cmd if c.startswith(name + '=')]


def test_run_demo_options(demo, tmp_path):
    work, data = str(tmp_path / 'work'), str(tmp_path / 'data')
    # Another config than the default (the tool checks that it exists).
    config = str(tmp_path / 'other.py')
    base = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
    with open(config, 'w') as f:
        f.write(f'_base_ = [{base!r}]\n')
    assert demo.main([
        '--config', config, '--work-dir', work, '--data-dir', data,
        '--num-train', '9', '--num-val', '4', '--max-iters', '30', '--num-vis',
        '2', '--min-gain', '1.4'
    ]) == 0  # mIoU 50 >= 1.4 x 33.3
    root = osp.join(data, 'ADEChallengeData2016')
    assert [(d, k['num_train'], k['num_val'])
            for d, k in demo.generated] == [(data, 9, 4)]
    train, test = demo.cmds
    assert train[1:3] == ['tools/train.py', config]
    assert test[1:3] == ['tools/test.py', config]
    assert test[3] == osp.join(work, 'iter_7.pth')
    assert train[train.index('--work-dir') + 1] == work
    for key in ('train', 'val', 'test'):
        assert _option(train, f'{key}_dataloader.dataset.data_root') == \
            [f'{key}_dataloader.dataset.data_root={root}']
    assert _option(test, 'test_dataloader.dataset.data_root')
    assert _option(train, 'train_cfg.max_iters') == ['train_cfg.max_iters=30']
    assert 'param_scheduler.0.end=3' in train  # warm-up: a tenth
    assert 'param_scheduler.1.end=30' in train
    (montage, ) = demo.montage
    assert montage == (root, osp.join(work, 'pred'),
                       osp.join(work, 'vis', 'predictions.png'), 2)
    # --min-gain: 50 < 1.6 x 33.3 fails; the data is now there.
    assert demo.main(
        ['--work-dir', work, '--data-dir', data, '--min-gain', '1.6']) == 1
    assert len(demo.generated) == 1
    # Without --max-iters, the config's schedule.
    assert not _option(demo.cmds[-2], 'train_cfg.max_iters')


def test_demo_sh_forwards_arguments(tmp_path):
    """demo.sh runs tools/run_demo.py from the repository root with
    $PYTHON and every argument; without an interpreter, a clear error."""
    log = tmp_path / 'args.txt'
    fake = tmp_path / 'python'
    fake.write_text(f'#!/bin/sh\npwd > {log}\nfor a in "$@"; do echo "$a" '
                    f'>> {log}; done\n')
    fake.chmod(0o755)
    script = osp.join(TOOLS, 'demo.sh')
    proc = subprocess.run(
        ['bash', script, '--work-dir', 'w d', '--max-iters', '5'],
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHON=str(fake)),
        capture_output=True,
        text=True)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        REPO, 'tools/run_demo.py', '--work-dir', 'w d', '--max-iters', '5'
    ]
    proc = subprocess.run(['bash', script],
                          cwd=str(tmp_path),
                          env=dict(
                              os.environ, PYTHON=str(tmp_path / 'missing')),
                          capture_output=True,
                          text=True)
    assert proc.returncode == 1 and 'make setup' in proc.stderr
