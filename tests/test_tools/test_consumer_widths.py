# Copyright (c) boat-mm contributors. All rights reserved.
"""The tools refuse a config whose necks or heads do not take the
channels its BOAT backbone outputs (tools/boat_tools/widths.py), before
the model is built: the error's ``--cfg-options`` make the model run, and
without them its first forward fails. The one-line errors of the tools
themselves are rows of test_cli_manner.py's CASES; every shipped config
passes the check (test_configs.py)."""
import argparse
import importlib
import os.path as osp
import shlex

import pytest
import torch
from boat_tools.cli import UsageError, load_config, merge_cfg_options
from boat_tools.config import add_cfg_options_arg
from mmengine.registry import init_default_scope
from repo_scripts import REPO

SEG = osp.join(REPO, 'configs/demo/boat-cswin-tiny_upernet_demo.py')
DET = osp.join(REPO, 'configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py')
CLS = osp.join(REPO, 'configs/boat_swin/boat-swin-tiny_16xb64_in1k.py')
# Arches whose widths the configs' consumers do not take.
CSWIN_16 = {'model.backbone.arch.embed_dims': 16}
# Two outputs: mmpretrain's head takes the last, pooled.
SWIN_16 = {
    'model.backbone.arch':
    dict(
        _delete_=True,
        embed_dims=16,
        depths=[2, 2, 2, 1],
        num_heads=[1, 2, 2, 2]),
    'model.backbone.out_indices': (1, 3)
}


def _forward(cfg) -> None:
    """Build the model of ``cfg`` and run what consumes the backbone's
    outputs on one small image."""
    scope = cfg.default_scope
    init_default_scope(scope)
    models = importlib.import_module(f'{scope}.registry').MODELS
    cfg.model.backbone.init_cfg = None
    model = models.build(cfg.model).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        if scope == 'mmseg':
            feats = model.extract_feat(x)
            model.decode_head(feats)
            model.auxiliary_head(feats)
        elif scope == 'mmdet':
            model.extract_feat(x)  # backbone and FPN
        else:
            model(x, mode='tensor')


@pytest.mark.parametrize(
    'path, options, keys', [
        (SEG, CSWIN_16, [
            'model.decode_head.in_channels=[32, 64, 128, 256] should be '
            '[16, 32, 64, 128]', 'model.auxiliary_head.in_channels=128 '
            'should be 64 (the width of output 2, its in_index)'
        ]),
        (DET, CSWIN_16, [
            'model.neck.in_channels=[32, 64, 128, 256] should be '
            '[16, 32, 64, 128] (one width per output of the backbone)'
        ]),
        (CLS, SWIN_16, [
            'model.head.in_channels=768 should be 128 (the width of the '
            'last output, pooled)'
        ]),
    ],
    ids=['seg', 'det', 'cls'])
def test_the_fix_makes_the_model_run(path, options, keys):
    with pytest.raises(UsageError) as err:
        load_config(path, options)
    message = str(err.value)
    assert all(key in message for key in keys), message
    # Without the check, the model builds and its first forward fails.
    cfg = load_config(path, options_follow=True)
    merge_cfg_options(cfg, options, check=False)
    with pytest.raises(RuntimeError):
        _forward(cfg)
    # The options the error names, as the shell passes them, fix it.
    fix = message.split('`--cfg-options ')[1].split('`')[0]
    parser = argparse.ArgumentParser()
    add_cfg_options_arg(parser)
    fixes = parser.parse_args(['--cfg-options', *shlex.split(fix)])
    cfg = load_config(path, dict(options, **fixes.cfg_options))
    _forward(cfg)


def test_options_fix_what_the_config_file_has(train_tool, tmp_path, capsys,
                                              monkeypatch):
    """train.py checks after merging --cfg-options: a config file whose
    widths are wrong runs with the options that fix them."""
    config = tmp_path / 'base_arch.py'
    config.write_text(f'_base_ = [{SEG!r}]\n'
                      "model = dict(backbone=dict(arch='base'))\n")
    monkeypatch.chdir(tmp_path)  # no demo data here: refused after
    with pytest.raises(SystemExit):
        train_tool.main([str(config)])
    assert 'should be [96, 192, 384, 768]' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_tool.main([
            str(config), '--cfg-options',
            'model.decode_head.in_channels=[96,192,384,768]',
            'model.auxiliary_head.in_channels=384'
        ])
    err = capsys.readouterr().err
    assert 'train_dataloader.dataset.data_root' in err, err


# A neck between the backbone and mmseg's heads: they take its outputs.
SEG_NECK = {
    'model.neck':
    dict(
        type='MultiLevelNeck', in_channels=[32, 64, 128, 256],
        out_channels=48),
    'model.decode_head.in_channels': [48] * 4,
    'model.auxiliary_head.in_channels':
    48
}


@pytest.mark.parametrize(
    'path, options', [
        (osp.join(
            REPO, 'configs/boat_swin/simmim_boat-swin-base-w6_8xb256-amp-'
            'coslr-100e_in1k-192px.py'), {
                'model.backbone.arch': 'tiny'
            }),
        (SEG, SEG_NECK),
        (DET, {
            'model.neck.type': 'PAFPN',
            'model.rpn_head.in_channels': 7
        }),
    ],
    ids=['simmim-decoder', 'seg-neck', 'det-rpn'])
def test_other_consumers_are_left_alone(path, options):
    """SimMIM's decoder (not known to take every output), the heads
    behind a neck, an RPN head: not checked."""
    load_config(path, options)


def test_concatenated_inputs_count_by_their_sum():
    """mmseg's resize_concat concatenates the maps of in_index: another
    order of the same widths runs, other widths do not; the maps a head
    takes apart are checked one by one."""
    head = {
        'model.auxiliary_head.input_transform': 'resize_concat',
        'model.auxiliary_head.in_index': [2, 3]
    }
    _forward(
        load_config(
            SEG, dict(head, **{'model.auxiliary_head.in_channels': [256,
                                                                    128]})))
    with pytest.raises(UsageError) as err:
        load_config(
            SEG, dict(head, **{'model.auxiliary_head.in_channels': [128,
                                                                    128]}))
    assert ('model.auxiliary_head.in_channels=[128, 128] should be [128, '
            '256] (outputs [2, 3], its in_index, concatenated: their sum '
            'counts)') in str(err.value)
    # UPerHead takes each map apart: the order counts.
    with pytest.raises(UsageError, match='one width each'):
        load_config(SEG, {'model.decode_head.in_channels': [64, 32, 128, 256]})


def test_a_neck_of_mmseg_is_checked():
    options = dict(SEG_NECK, **{'model.neck.in_channels': [32, 64, 128]})
    with pytest.raises(
            UsageError,
            match=r'model.neck.in_channels=\[32, 64, '
            r'128\] should be \[32, 64, 128, 256\]'):
        load_config(SEG, options)


def test_a_backbone_with_its_scope_noted_is_checked_as_built():
    """``_scope_`` (MMEngine's note of a dict's scope, which its registry
    takes out before the build) is not an argument of the backbone: the
    config loads and builds; a bad argument beside it is still refused."""
    cfg = load_config(SEG, {'model.backbone._scope_': 'mmseg'})
    _forward(cfg)
    with pytest.raises(UsageError, match='drop_path_rate'):
        load_config(
            SEG, {
                'model.backbone._scope_': 'mmseg',
                'model.backbone.drop_path_rate': 1.5
            })
