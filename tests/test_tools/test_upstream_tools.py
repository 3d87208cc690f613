# Copyright (c) boat-mm contributors. All rights reserved.
"""The upstream libraries' own tools (``<pkg>/.mim/tools``, what
``mim run`` runs) on boat-mm's configs: what boat-mm gives them.

* mmpretrain's (and mmdet's) ``get_flops.py`` count with mmengine's
  ``get_model_complexity_info``: ``import boat_mm`` adds the handles of
  FSLA's operators and SDPA to mmengine's defaults (whichever of the two
  is imported first), so the tool's count is ours
  (``boat_mm.analysis.complexity``).
* mmpretrain's ``vis_cam.py --vit-like`` folds a ``(B, L, C)`` target layer
  into a map after dropping the backbone's ``num_extra_tokens``.
* mmpretrain's ``browse_dataset.py`` passes the config's ``visualizer``
  items to ``UniversalVisualizer`` itself.

docs/upstream_tools.md lists which tools work and how they are run.
"""
import importlib
import importlib.util
import math
import os
import os.path as osp
import runpy
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from tiny_configs import cswin_classifier, swin_classifier

import boat_mm  # noqa: F401

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CLS_CONFIGS = [
    osp.join(REPO, 'configs', family, name) for family, name in [
        ('boat_swin', 'boat-swin-tiny_16xb64_in1k.py'),
        ('boat_swin', 'boat-swin-small_16xb64_in1k.py'),
        ('boat_swin', 'boat-swin-base_16xb64_in1k.py'),
        ('boat_cswin', 'boat-cswin-tiny_8xb256_in1k.py'),
        ('boat_cswin', 'boat-cswin-small_8xb256_in1k.py'),
        ('boat_cswin', 'boat-cswin-base_8xb128_in1k.py'),
    ]
]


def _upstream_tool(package: str, *path: str) -> str:
    """The path of a tool that ``package``'s wheel ships (``mim run``)."""
    root = osp.dirname(importlib.import_module(package).__file__)
    tool = osp.join(root, '.mim', 'tools', *path)
    assert osp.isfile(tool), f'{package} ships no {"/".join(path)}'
    return tool


def _run_tool(tool: str, argv: list, monkeypatch) -> dict:
    """Run a tool script as ``python TOOL ARGV``, in this process."""
    monkeypatch.setattr(sys, 'argv', [tool, *argv])
    return runpy.run_path(tool, run_name='__main__')


def test_mmpretrain_get_flops_counts_fsla_and_sdpa(tmp_path, monkeypatch,
                                                   capsys):
    """Upstream get_flops.py on a BOAT-CSWin classifier prints our count
    (before: FSLA's ops and SDPA were "unsupported operators", uncounted)."""
    from mmengine.analysis.print_helper import _format_size
    from mmpretrain import get_model

    from boat_mm.analysis.complexity import get_model_complexity
    cfg = tmp_path / 'tiny_cswin.py'
    # A tiny BOAT-CSWin classifier: CSWin's stripes run SDPA, FSLA its ops.
    cfg.write_text(cswin_classifier(CLS_CONFIGS[3]))
    # 56 x 56 maps: CSWin's stripes (1, 2, 7, 7 wide) need no padding, so
    # the dense count of a traced SDPA is its count of allowed pairs.
    tool = _upstream_tool('mmpretrain', 'analysis_tools', 'get_flops.py')
    _run_tool(tool, [str(cfg), '--shape', '224'], monkeypatch)
    out = capsys.readouterr().out
    printed = out.split('Flops: ')[1].split('\n')[0]

    model = get_model(str(cfg))
    model.forward = model.extract_feat  # what the tool counts
    # FSLA's attention as the trace holds it: the op, counted on its
    # allowed pairs, where a kernel runs it; else (tensor ops) an SDPA
    # with a mask built in the graph, which mmengine's handle counts dense.
    from boat_mm.ops import _backends
    ours = get_model_complexity(
        model, (3, 224, 224),
        masked_attention='allowed'
        if _backends.cpu_kernel_loaded() else 'dense')
    assert ours['by_operator']['sdpa'] > 0
    assert ours['by_operator']['fsla_clustering'] > 0
    assert printed == _format_size(ours['flops'])
    # Exactly: mmengine's counter (what the tool calls) with the handles
    # that import boat_mm gave it.
    from mmengine.analysis import get_model_complexity_info
    info = get_model_complexity_info(model, input_shape=(3, 224, 224))
    assert info['flops'] == ours['flops']


def _vis_cam_module(monkeypatch) -> dict:
    """mmpretrain's vis_cam.py loaded without running it. pytorch-grad-cam
    (not a boat-mm dependency) is replaced by empty modules: only the
    tool's own ``reshape_transform`` and ``get_default_target_layers`` are
    called here."""
    grad_cam = types.ModuleType('pytorch_grad_cam')
    base_cam = types.ModuleType('pytorch_grad_cam.base_cam')
    base_cam.BaseCAM = type('BaseCAM', (), {})
    grad_cam.base_cam = base_cam
    # The CAM methods the tool offers are BaseCAM's subclasses.
    for method in ('GradCAM', 'GradCAMPlusPlus'):
        setattr(grad_cam, method, type(method, (base_cam.BaseCAM, ), {}))
    acts = types.ModuleType('pytorch_grad_cam.activations_and_gradients')
    acts.ActivationsAndGradients = object
    image = types.ModuleType('pytorch_grad_cam.utils.image')
    image.show_cam_on_image = None
    for name, module in [('pytorch_grad_cam', grad_cam),
                         ('pytorch_grad_cam.base_cam', base_cam),
                         ('pytorch_grad_cam.activations_and_gradients', acts),
                         ('pytorch_grad_cam.utils',
                          types.ModuleType('pytorch_grad_cam.utils')),
                         ('pytorch_grad_cam.utils.image', image)]:
        monkeypatch.setitem(sys.modules, name, module)
    tool = _upstream_tool('mmpretrain', 'visualization', 'vis_cam.py')
    return runpy.run_path(tool, run_name='vis_cam')


# vis_cam.py imports pkg_resources (deprecated by setuptools).
@pytest.mark.filterwarnings('ignore:pkg_resources is deprecated')
@pytest.mark.parametrize('family', ['boat_swin', 'boat_cswin'])
def test_vis_cam_vit_like_folds_the_last_norm_into_the_output_map(
        family, tmp_path, monkeypatch):
    """``vis_cam.py --vit-like`` picks ``backbone.norm3`` and folds its
    tokens into the map that the backbone outputs (before: taken for a
    ViT with a class token, a norm of the last block, one token dropped,
    "48 is not a perfect square")."""
    from mmpretrain import get_model
    vis_cam = _vis_cam_module(monkeypatch)
    cfg = tmp_path / 'tiny.py'
    base = CLS_CONFIGS[0 if family == 'boat_swin' else 3]
    classifier = swin_classifier if family == 'boat_swin' else cswin_classifier
    cfg.write_text(classifier(base))
    model = get_model(str(cfg)).eval()
    # The command line of docs/upstream_tools.md (test_doc_examples.py's
    # test_command_is_covered holds its options to these), read by the
    # tool's own parser.
    monkeypatch.setattr(sys, 'argv', [
        'vis_cam.py', 'image.png',
        str(cfg), 'model.pth', '--vit-like', '--save-path', 'cam.png'
    ])
    args = vis_cam['parse_args']()
    layer, = vis_cam['get_default_target_layers'](model, args)
    assert layer is model.backbone.norm3

    tokens = []
    handle = layer.register_forward_hook(lambda m, i, o: tokens.append(o))
    with torch.no_grad():
        feat, = model.backbone(torch.randn(1, 3, 96, 96))
    handle.remove()
    folded = vis_cam['reshape_transform'](tokens[0], model, args)
    torch.testing.assert_close(folded, feat, rtol=0, atol=0)


def _scaled(x: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1], as a CAM is shown."""
    x = x - x.min()
    return x / (1e-7 + x.max())


def _grad_cam(model, inputs: torch.Tensor, layer: torch.nn.Module,
              category: int) -> np.ndarray:
    """Grad-CAM of ``category`` on ``layer``'s ``(1, H * W, C)`` tokens,
    computed here: the channels weighted by their mean gradient of the
    class logit, summed, clamped at 0, scaled and resized to the input."""
    tokens = []
    handle = layer.register_forward_hook(lambda m, i, o: tokens.append(o))
    logits = model(inputs, mode='tensor')
    handle.remove()
    grad, = torch.autograd.grad(logits[0, category], tokens[0])
    side = math.isqrt(tokens[0].shape[1])  # the tool takes a square map

    def fold(t):  # raster-order tokens -> (C, H, W)
        return t[0].transpose(0, 1).reshape(-1, side, side)

    cam = (fold(grad).mean((1, 2))[:, None, None] * fold(tokens[0])).sum(0)
    cam = _scaled(cam.clamp(min=0).detach().numpy())
    height, width = inputs.shape[-2:]
    return _scaled(cv2.resize(cam, (width, height)))


# vis_cam.py imports pkg_resources (deprecated by setuptools).
@pytest.mark.filterwarnings('ignore:pkg_resources is deprecated')
@pytest.mark.skipif(
    importlib.util.find_spec('pytorch_grad_cam') is None,
    reason='grad-cam is not installed: pip install -r '
    'requirements/optional.txt')
@pytest.mark.parametrize(
    'layer', [None, 'backbone.stages.2.blocks.0.norm1'],
    ids=['default', 'block'])
@pytest.mark.parametrize('family', ['boat_swin', 'boat_cswin'])
def test_vis_cam_runs_with_grad_cam(family, layer, tmp_path, monkeypatch,
                                    capsys):
    """mmpretrain's vis_cam.py with grad-cam (the version of
    requirements/optional.txt) on a tiny BOAT classifier, as
    docs/upstream_tools.md runs it: with the default target layer (the
    last output norm) and with a block's tokens, the CAM of each of two
    classes is what Grad-CAM computes, not all zero, and differs between
    them."""
    from mmpretrain import get_model
    cfg = tmp_path / 'tiny.py'
    classifier = swin_classifier if family == 'boat_swin' else cswin_classifier
    cfg.write_text(classifier(CLS_CONFIGS[0 if family == 'boat_swin' else 3]))
    torch.manual_seed(0)
    ckpt = str(tmp_path / 'tiny.pth')
    torch.save(dict(state_dict=get_model(str(cfg)).state_dict()), ckpt)
    image = str(tmp_path / 'image.png')
    cv2.imwrite(
        image,
        np.random.default_rng(0).integers(0, 256, (240, 300, 3), np.uint8))

    tool = _upstream_tool('mmpretrain', 'visualization', 'vis_cam.py')
    main = runpy.run_path(tool, run_name='vis_cam')['main']
    # What the tool builds, computes and draws, kept (its own calls run).
    seen = dict(cams=[])
    tool_globals = main.__globals__
    show, build = tool_globals['show_cam_grad'], tool_globals['get_model']

    def get_model_kept(*args, **kwargs):
        seen['model'] = build(*args, **kwargs)
        seen['model'].backbone.register_forward_pre_hook(
            lambda m, i: seen.setdefault('inputs', i[0].detach()))
        return seen['model']

    def show_kept(cam, *args, **kwargs):
        seen['cams'].append(cam)
        return show(cam, *args, **kwargs)

    monkeypatch.setitem(tool_globals, 'get_model', get_model_kept)
    monkeypatch.setitem(tool_globals, 'show_cam_grad', show_kept)
    for category in (1, 2):
        argv = [
            image,
            str(cfg), ckpt, '--vit-like', '--save-path',
            str(tmp_path / f'cam{category}.png'), '--target-category',
            str(category)
        ]
        if layer:
            argv += ['--target-layers', layer]
        monkeypatch.setattr(sys, 'argv', ['vis_cam.py', *argv])
        # The config's scope, as in the tool's own process (a test before
        # may have left another current).
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            main()
    default = 'Automatically choose the last norm layer "backbone.norm3"'
    assert (default in capsys.readouterr().out) == (layer is None)

    model, inputs = seen['model'], seen.pop('inputs')
    assert inputs.shape == (1, 3, 224, 224)  # the config's test pipeline
    target = dict(model.named_modules())[layer or 'backbone.norm3']
    for category, got in zip((1, 2), seen['cams']):
        assert got.shape == (1, 224, 224)
        expected = _grad_cam(model, inputs, target, category)
        np.testing.assert_allclose(got[0], expected, atol=1e-4)
        assert got.max() > 0.99
        drawn = cv2.imread(str(tmp_path / f'cam{category}.png'))
        assert drawn.shape == (224, 224, 3)
    assert np.abs(seen['cams'][0] - seen['cams'][1]).max() > 0.1


def test_browse_dataset_draws_the_images_of_a_classifier_config(
        imagenet_root, tmp_path, monkeypatch):
    """mmpretrain's browse_dataset.py on a BOAT-Swin classifier config
    with the generated data: the original images, one file each."""
    cfg = tmp_path / 'tiny_swin.py'
    cfg.write_text(
        swin_classifier(CLS_CONFIGS[0]) +
        f'train_dataloader = dict(dataset=dict(data_root={imagenet_root!r}))\n'
    )
    out = tmp_path / 'browse'
    tool = _upstream_tool('mmpretrain', 'visualization', 'browse_dataset.py')
    _run_tool(tool, [
        str(cfg), '--output-dir',
        str(out), '--mode', 'original', '--show-number', '1', '--not-show'
    ], monkeypatch)
    with open(osp.join(imagenet_root, 'meta', 'train.txt')) as f:
        first = f.readline().split()[0]
    assert os.listdir(out) == [osp.basename(first)]


@pytest.mark.parametrize(
    'config', CLS_CONFIGS, ids=[osp.basename(c) for c in CLS_CONFIGS])
def test_browse_dataset_builds_the_visualizer_of_every_classifier(config):
    """mmpretrain's browse_dataset.py drops ``type`` and passes the rest of
    ``cfg.visualizer`` to ``UniversalVisualizer`` (before: the ``_scope_``
    of the ``mmpretrain::`` base was an unexpected keyword)."""
    from mmpretrain.visualization import UniversalVisualizer
    vis = Config.fromfile(config).visualizer.to_dict()
    assert vis.pop('type') == 'UniversalVisualizer'
    fig = dict(figsize=(16, 10))
    visualizer = UniversalVisualizer(**vis, fig_show_cfg=fig, fig_save_cfg=fig)
    assert isinstance(visualizer, UniversalVisualizer)


def test_default_handles_are_added_not_overridden():
    """``import boat_mm`` adds its handles to mmengine's tables and keeps
    a handle mmengine already has (a later mmengine may count SDPA)."""
    from boat_mm.analysis import flop_handles
    mine = object()
    module = types.SimpleNamespace(
        _DEFAULT_SUPPORTED_FLOP_OPS={
            'aten::scaled_dot_product_attention': mine
        },
        _DEFAULT_SUPPORTED_ACT_OPS={})
    flop_handles.register_default_handles(module)
    flops = module._DEFAULT_SUPPORTED_FLOP_OPS
    assert flops['aten::scaled_dot_product_attention'] is mine
    for namespace in flop_handles.FSLA_NAMESPACES:
        assert flops[f'{namespace}::balanced_clustering'] is \
            flop_handles.clustering_handle
        assert f'{namespace}::clustered_attention' in flops
    assert 'aten::scaled_dot_product_attention' in \
        module._DEFAULT_SUPPORTED_ACT_OPS
    # A mmengine without the tables is left alone.
    flop_handles.register_default_handles(types.SimpleNamespace())


def test_handles_module_imported_before_mmengine_analysis(monkeypatch):
    """Imported first, as a fresh interpreter may, the handles' module does
    not start the import of mmengine.analysis, whose hook needs that module
    whole (before: "cannot import name 'register_default_handles' from
    partially initialized module")."""
    import mmengine
    import mmengine.analysis  # noqa: F401  (the state to restore)

    import boat_mm.analysis.flop_handles  # noqa: F401
    from boat_mm.utils import when_imported

    # A fresh interpreter's state in this one (restored afterwards): no
    # mmengine.analysis, no handles' module, the hook of `import boat_mm`.
    monkeypatch.setattr(mmengine, 'analysis', mmengine.analysis)
    monkeypatch.setattr(boat_mm.analysis, 'flop_handles',
                        boat_mm.analysis.flop_handles)
    for name in list(sys.modules):
        if (name.startswith('mmengine.analysis')
                or name == 'boat_mm.analysis.flop_handles'):
            monkeypatch.delitem(sys.modules, name)
    when_imported('mmengine.analysis.complexity_analysis',
                  boat_mm._register_flop_handles)
    handles = importlib.import_module('boat_mm.analysis.flop_handles')
    assert 'mmengine.analysis' not in sys.modules
    table = importlib.import_module(
        'mmengine.analysis.complexity_analysis')._DEFAULT_SUPPORTED_FLOP_OPS
    assert table['boat_mm::balanced_clustering'] is handles.clustering_handle


def test_grad_cam_pin_is_in_mmpretrains_range():
    """requirements/optional.txt pins grad-cam inside the range of
    mmpretrain's ``optional`` extra (grad-cam 1.5 dropped an argument that
    vis_cam.py passes), and docs/upstream_tools.md names that version."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    with open(osp.join(REPO, 'requirements', 'optional.txt')) as f:
        pin, = [
            Requirement(line.strip()) for line in f
            if line.startswith('grad-cam')
        ]
    version, = [s.version for s in pin.specifier]
    upstream, = [
        Requirement(r) for r in requires('mmpretrain')
        if r.startswith('grad-cam') and 'optional' in r
    ]
    assert upstream.specifier.contains(version)
    assert not upstream.specifier.contains('1.5.0')
    with open(osp.join(REPO, 'docs', 'upstream_tools.md')) as f:
        doc = ' '.join(f.read().split())
    assert f'grad-cam {version}' in doc and f'pins {version}' in doc
