# Copyright (c) boat-mm contributors. All rights reserved.
"""tools/analysis_tools/get_flops.py: scopes, output and errors (the
counting itself is tested in tests/test_analysis/test_complexity.py)."""
import os.path as osp
import re

import pytest
from repo_scripts import load_script

from boat_mm.utils.metafile import load_models, published_complexity


@pytest.fixture(scope='module')
def get_flops():
    return load_script('tools/analysis_tools/get_flops.py')


def _tiny_config(path, base: str, heads: str) -> str:
    """Write a user config inheriting ``base`` with a tiny arch (16
    channels, two blocks in stage 0 and one in the others, so that both
    families have FSLA; no pretrained weights) to ``path``.

    Args:
        path (pathlib.Path): Where to write it.
        base (str): Path of the config to inherit.
        heads (str): The other items of ``model = dict(...)``.

    Returns:
        str: ``path``.
    """
    path.write_text(
        f'_base_ = [{base!r}]\n'
        'model = dict(\n'
        '    backbone=dict(arch=dict(_delete_=True, embed_dims=16,\n'
        '                            depths=[2, 1, 1, 1],\n'
        '                            num_heads=[2, 2, 4, 4]),\n'
        '                  init_cfg=None),\n' + heads + ')\n')
    return str(path)


def _value(out: str, key: str) -> str:
    return re.search(rf'^{re.escape(key)}\s+(.+)$', out, re.M).group(1)


def test_get_flops_cli_classification(get_flops, repo_root, capsys):
    cfg = osp.join(repo_root, 'configs', 'boat_swin',
                   'boat-swin-tiny_16xb64_in1k.py')
    assert get_flops.main([cfg, '--shape', '64', '64']) == 0
    out = capsys.readouterr().out
    assert _value(out, 'Scope') == 'mmpretrain'
    assert _value(out, 'Input shape') == '(3, 64, 64)'
    published = published_complexity()[osp.relpath(cfg, repo_root)]
    assert _value(out, 'Params (M)') == \
        f'{published.published_params / 1e6:.2f}'  # the published count
    assert float(_value(out, 'FLOPs (G)')) > 0
    assert 'sdpa (G)' in out and 'fsla_clustering (G)' in out


def test_get_flops_cli_segmentation_tiny_arch(get_flops, repo_root, tmp_path,
                                              capsys):
    """A user config inheriting ours with a tiny arch; aux head dropped."""
    base = osp.join(repo_root, 'configs', 'boat_cswin',
                    'boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py')
    cfg = _tiny_config(
        tmp_path / 'tiny_upernet.py', base,
        '    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32),\n'
        '    auxiliary_head=dict(in_channels=64, channels=16)')
    info = get_flops.count_config(cfg, (64, 64))
    model = info['model']
    assert info['scope'] == 'mmseg' and model.auxiliary_head is None
    assert info['params'] == sum(p.numel() for p in model.parameters())
    assert info['input_shape'] == (3, 64, 64)
    assert get_flops.main([cfg, '--shape', '64']) == 0
    out = capsys.readouterr().out
    assert _value(out, 'Input shape') == '(3, 64, 64)'
    assert float(_value(out, 'FLOPs (G)')) == round(info['flops'] / 1e9, 2)


@pytest.mark.parametrize('config,shape,source', [
    ('configs/boat_swin/boat-swin-tiny_16xb64_in1k.py',
     (224, 224), "test_dataloader's pipeline"),
    ('configs/boat_swin/boat-swin-base-w6_simmim-100e-pre_8xb256-coslr-'
     '100e_in1k-192px.py', (192, 192), "test_dataloader's pipeline"),
    ('configs/boat_cswin/simmim_boat-cswin-base_8xb256-amp-coslr-100e_'
     'in1k-192px.py', (192, 192), "train_dataloader's pipeline"),
    ('configs/demo/boat-cswin-tiny_upernet_demo.py',
     (128, 128), 'model.data_preprocessor.size'),
    ('configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py',
     (800, 1280), 'the mmdet default'),
])
def test_default_shape_per_config(get_flops, repo_root, monkeypatch, config,
                                  shape, source):
    """Without --shape: the size the config's model sees (the test crop of
    a classifier, 192 as the name says; a SimMIM config's training crop;
    the demo segmentor's ``crop_size = (128, 128)``), and the detection
    default; the output says where it came from, and --shape wins (the
    count is stood in for: the input shape is what is checked)."""
    counted, printed = [], []
    monkeypatch.setattr(
        get_flops, 'get_model_complexity', lambda model, input_shape, **kwargs:
        counted.append(input_shape) or dict(input_shape=input_shape))
    monkeypatch.setattr(get_flops, '_print_result',
                        lambda config, info: printed.append(info))
    path = osp.join(repo_root, config)
    assert get_flops.main([path]) == 0
    assert get_flops.main([path, '--shape', '32']) == 0
    assert counted == [(3, *shape), (3, 32, 32)]
    assert source in printed[0]['shape_from']
    assert printed[1]['shape_from'] is None


@pytest.mark.parametrize('pipeline,size', [
    ([dict(type='ResizeEdge', scale=256)], None),
    ([dict(type='Resize', scale=(320, 240), keep_ratio=True)], None),
    ([dict(type='mmcv.Resize', scale=(320, 240))], (240, 320)),
    ([dict(type='CenterCrop', crop_size=(320, 240)),
      dict(type='PackInputs')], (240, 320)),
    ([dict(type='RandomResizedCrop', scale=(240, 320))], (240, 320)),
    ([dict(type='CenterCrop', crop_size=96),
      dict(type='Resize', scale=64)], (64, 64)),
    ([dict(type='EfficientNetCenterCrop', crop_size=384)], (384, 384)),
    ([dict(type='EfficientNetRandomCrop', scale=475)], (475, 475)),
])
def test_pipeline_size_reads_each_transform_s_order(get_flops, pipeline, size):
    """mmcv's CenterCrop and Resize give (w, h), mmpretrain's
    RandomResizedCrop (h, w); a Resize keeping the ratio fixes no size, and
    the last transform that fixes one wins."""
    assert get_flops._pipeline_size(pipeline) == size


def test_default_shape_without_a_fixed_size(get_flops):
    """A classifier whose pipelines fix no size, and a segmentor without
    ``data_preprocessor.size``: the help's 224 and 512."""
    from mmengine.config import Config
    cls = Config(
        dict(
            test_dataloader=dict(
                dataset=dict(pipeline=[dict(type='ResizeEdge', scale=256)])),
            model=dict()))
    seg = Config(dict(model=dict(data_preprocessor=dict(type='X'))))
    assert get_flops.default_shape(cls, 'mmpretrain')[0] == (224, 224)
    assert get_flops.default_shape(seg, 'mmseg')[0] == (512, 512)


def test_get_flops_cli_errors(get_flops, tmp_path, capsys):
    cfg = tmp_path / 'no_scope.py'
    cfg.write_text('model = dict(type="BOATSwin")\n')
    for argv, message in [([str(cfg)], 'default_scope'),
                          ([str(tmp_path / 'missing.py')], 'not found'),
                          ([], 'give a CONFIG, or --check-reference')]:
        with pytest.raises(SystemExit) as exc:
            get_flops.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize('config, size', [
    ('configs/boat_swin/boat-swin-tiny_16xb64_in1k.py', 224),
    ('configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py', 224),
    ('configs/boat_cswin/simmim_boat-cswin-base_8xb256-amp-coslr-100e_'
     'in1k-192px.py', 192),
    ('configs/boat_swin/boat-swin-base-w6_simmim-100e-pre_8xb256-coslr-'
     '100e_in1k-192px.py', 192),
])
def test_metafile_flops_are_get_flops_multiply_adds(get_flops, repo_root,
                                                    config, size):
    """A classifier's ``Metadata.FLOPs`` (the model-zoo tables') is what
    get_flops.py counts at its input size (224, or 192 as its name says),
    a SimMIM model's at 192: its multiply-adds, to 0.01 G."""
    listed = {m.config: m for m in load_models(repo_root)}[config]
    info = get_flops.count_config(osp.join(repo_root, config), (size, size))
    assert round(info['macs'] / 1e9, 2) == listed.flops / 1e9
    assert round(info['params'] / 1e4) == listed.params / 1e4


def test_get_flops_of_a_single_stage_detector(get_flops, repo_root, tmp_path):
    """RetinaNet (no roi_head): the count runs its dense head on the FPN
    levels. The backbone's share equals the backbone counted alone; the
    head's is the multiply-adds of its 3x3 convolutions at every position
    of every level."""
    import torch
    from torch import nn

    from boat_mm.analysis.complexity import get_model_complexity
    base = osp.join(repo_root, 'configs', 'boat_swin',
                    'retinanet_boat-swin-tiny_fpn_1x_coco.py')
    cfg = _tiny_config(
        tmp_path / 'tiny_retinanet.py', base,
        '    neck=dict(in_channels=[32, 64, 128], out_channels=32),\n'
        '    bbox_head=dict(in_channels=32, feat_channels=32,\n'
        '                   stacked_convs=1)')
    info = get_flops.count_config(cfg, (64, 64))
    assert info['scope'] == 'mmdet'
    detector = info['model'].detector
    assert not hasattr(detector, 'roi_head')
    by_module = info['analyzer'].by_module()
    alone = get_model_complexity(detector.backbone, (3, 64, 64))
    assert by_module['detector.backbone'] == alone['flops']
    with torch.no_grad():
        feats = detector.extract_feat(torch.zeros(1, 3, 64, 64))
    positions = sum(f.shape[-2] * f.shape[-1] for f in feats)
    assert len(feats) == 5 and positions == 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1
    convs = [
        m for m in detector.bbox_head.modules() if isinstance(m, nn.Conv2d)
    ]
    assert all(m.kernel_size == (3, 3) for m in convs)
    per_position = sum(9 * m.in_channels * m.out_channels for m in convs)
    assert by_module['detector.bbox_head'] == positions * per_position
