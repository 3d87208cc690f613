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
import os
import os.path as osp
import runpy
import sys
import types

import pytest
import torch
from mmengine.config import Config
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
