# Copyright (c) boat-mm contributors. All rights reserved.
"""Every shipped config loads and builds its full model."""
import ast
import glob
import importlib
import os.path as osp
import sys
import warnings

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

import boat_mm  # noqa: F401
from boat_mm.models import boat_families
from boat_mm.utils.metafile import load_models, published_complexity

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools')
# As tests/test_tools/conftest.py: the tools' shared code, appended.
if TOOLS not in sys.path:
    sys.path.append(TOOLS)
from boat_tools.widths import check_consumer_widths  # noqa: E402

CONFIGS = sorted(
    osp.relpath(p, ROOT) for p in glob.glob(
        osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p)

# Parameter counts of the published classifiers (configs/*/metafile.yml).
PARAMS_M = {
    osp.basename(config): model.published_params / 1e6
    for config, model in published_complexity(ROOT).items()
}
# Parameters of every model of the metafiles (and the model-zoo tables,
# which test_metafile.py compares with them), in millions.
METAFILE_PARAMS_M = {m.config: m.params / 1e6 for m in load_models(ROOT)}


def test_every_family_has_cls_and_seg_configs():
    names = [osp.basename(c) for c in CONFIGS]
    assert set(PARAMS_M) <= set(names)
    for family in (f.family for f in boat_families()):
        for arch in ('tiny', 'small', 'base'):
            assert (f'boat-{family}-{arch}_upernet_8xb2-160k_ade20k-'
                    '512x512.py') in names
    assert 'boat_upernet_ade20k.py' in names


def test_every_family_has_detection_configs():
    names = [osp.basename(c) for c in CONFIGS]
    for family in (f.family for f in boat_families()):
        for arch in ('tiny', 'small'):
            model = f'boat-{family}-{arch}'
            assert f'mask-rcnn_{model}_fpn_1x_coco.py' in names
            assert f'mask-rcnn_{model}_fpn_ms-crop-3x_coco.py' in names
            assert f'retinanet_{model}_fpn_1x_coco.py' in names


def test_detection_recipe():
    """mmdet's Swin recipes: Mask R-CNN with AdamW, no decay on norms and
    position tables, drop path, ImageNet weights through init_cfg, 12 / 36
    epochs; RetinaNet with mmdet's SGD schedule at lr 0.01."""
    root = osp.join(ROOT, 'configs')
    cfg = Config.fromfile(
        osp.join(root, 'boat_swin',
                 'mask-rcnn_boat-swin-small_fpn_1x_coco.py'))
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert keys['norm'] == keys['relative_position_bias_table'] == dict(
        decay_mult=0.)
    # mmdet's Swin-S Mask R-CNN keeps its Swin-T base's drop path.
    assert cfg.model.backbone.drop_path_rate == 0.2
    assert cfg.model.backbone.init_cfg == dict(
        type='Pretrained',
        checkpoint='checkpoints/boat-swin-small_in1k.pth',
        prefix='backbone.')
    assert cfg.train_cfg.max_epochs == 12
    cfg = Config.fromfile(
        osp.join(root, 'boat_cswin',
                 'mask-rcnn_boat-cswin-tiny_fpn_ms-crop-3x_coco.py'))
    assert cfg.train_cfg.max_epochs == 36
    assert cfg.param_scheduler[1].milestones == [27, 33]
    choice = cfg.train_dataloader.dataset.pipeline[3]
    assert choice.type == 'RandomChoice' and len(choice.transforms) == 2
    cfg = Config.fromfile(
        osp.join(root, 'boat_cswin',
                 'retinanet_boat-cswin-tiny_fpn_1x_coco.py'))
    assert cfg.model.backbone.out_indices == (1, 2, 3)
    assert cfg.model.neck.in_channels == [128, 256, 512]
    assert (cfg.optim_wrapper.optimizer.type,
            cfg.optim_wrapper.optimizer.lr) == ('SGD', 0.01)


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_full_model(path):
    cfg = Config.fromfile(osp.join(ROOT, path))
    scope = cfg.default_scope
    assert scope in ('mmseg', 'mmpretrain', 'mmdet')
    assert 'boat_mm' in cfg.custom_imports['imports']
    init_default_scope(scope)
    # The tools' check of the widths of the necks and heads passes.
    check_consumer_widths(cfg)
    models = importlib.import_module(f'{scope}.registry').MODELS
    if scope != 'mmpretrain':
        # The converted ImageNet weights are not part of the repo.
        cfg.model.backbone.init_cfg = None
    model = models.build(cfg.model)
    # (A family, or its SimMIM variant.)
    assert isinstance(model.backbone, boat_families())
    widths = [
        model.backbone.get_submodule(f'norm{i}').normalized_shape[0]
        for i in model.backbone.out_indices
    ]
    # What the check computes from the config, without building.
    args = {k: v for k, v in cfg.model.backbone.items() if k != 'type'}
    assert list(type(
        model.backbone).output_channels(**args).values()) == widths
    if scope == 'mmdet':
        # The FPN takes the widths of the stages the backbone outputs.
        assert list(model.neck.in_channels) == widths
    params = sum(p.numel() for p in model.parameters()) / 1e6
    expected = PARAMS_M.get(osp.basename(path))
    if expected is not None:
        assert round(params, 2) == expected
    listed = METAFILE_PARAMS_M.get(path)
    if listed is not None:
        if scope == 'mmseg':
            # Counted for the inference model, as get_flops.py counts it:
            # the auxiliary head trains only.
            params -= sum(p.numel()
                          for p in model.auxiliary_head.parameters()) / 1e6
        assert round(params, 2) == listed, path


def _unreadable_floats(path: str) -> list:
    """Float arithmetic on constants in a config file whose result prints
    with rounding noise (``1 - 0.99984`` is 0.000160000000000049 in the
    config dump every log starts with)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.BinOp) or not all(
                isinstance(n, (ast.Constant, ast.operator, ast.unaryop,
                               ast.BinOp, ast.UnaryOp))
                for n in ast.walk(node)):
            continue
        value = eval(compile(ast.Expression(node), path, 'eval'))
        if isinstance(value, float) and float(f'{value:.12g}') != value:
            found.append(f'{path}:{node.lineno}: {ast.unparse(node)} = '
                         f'{value!r}')
    return found


def test_config_numbers_print_readably():
    files = glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
    found = [
        line for path in sorted(files) for line in _unreadable_floats(path)
    ]
    assert not found, 'write the value instead:\n' + '\n'.join(found)


def test_demo_seg_pipelines_reduce_labels_without_warnings(ade_root):
    """mmseg warns that ``LoadAnnotations(reduce_zero_label=...)`` is
    deprecated; the demo leaves it to ADE20KDataset, which still reduces
    the labels (0 ignored as 255, k as k - 1)."""
    from mmseg.registry import DATASETS
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py'))
    init_default_scope('mmseg')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        samples = [
            DATASETS.build(dict(cfg[loader].dataset, data_root=ade_root))[0]
            for loader in ('train_dataloader', 'val_dataloader')
        ]
    assert not [
        str(w.message) for w in caught if 'reduce_zero_label' in str(w.message)
    ]
    val = samples[1]
    png = cv2.imread(val['data_samples'].seg_map_path, cv2.IMREAD_UNCHANGED)
    want = np.where(png == 0, 255, png.astype(np.int64) - 1)
    got = val['data_samples'].gt_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(got, want)
    # The train pipeline crops: its labels are ignored or 0..7 all the same.
    train = samples[0]['data_samples'].gt_sem_seg.data
    assert set(train.unique().tolist()) <= set(range(8)) | {255}
