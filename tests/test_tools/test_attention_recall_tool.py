# Copyright (c) boat-mm contributors. All rights reserved.
"""tools/analysis_tools/attention_recall.py on tiny classification,
segmentation and detection configs."""
import json
import os
import os.path as osp
import re
import runpy
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from tiny_configs import SEG_OPTIONS, swin_classifier, swin_retinanet

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(REPO, 'tools', 'analysis_tools', 'attention_recall.py')
DEMO_SEG = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
SWIN_CLS = osp.join(REPO, 'configs', 'boat_swin',
                    'boat-swin-tiny_16xb64_in1k.py')
DET_DEMO = osp.join(REPO, 'configs', 'demo',
                    'mask-rcnn_boat-cswin-tiny_fpn_demo.py')
RETINANET = osp.join(REPO, 'configs', 'boat_swin',
                     'retinanet_boat-swin-tiny_fpn_1x_coco.py')

# The tiny RetinaNet at a small test size.
RETINANET_PIPELINE = """
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 64), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                          'img_shape', 'scale_factor'))
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


@pytest.fixture(scope='module')
def tool():
    return runpy.run_path(TOOL, run_name='attention_recall')


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> list:
    """Two images: noise with two far-apart patches of one texture."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp('recall')
    paths = []
    for i in range(2):
        img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        img[8:24, 8:24] = (20, 200, 40)
        img[40:56, 56 + i * 4:72 + i * 4] = (20, 200, 40)
        paths.append(str(folder / f'img{i}.png'))
        cv2.imwrite(paths[-1], img)
    return paths


def _check_records(res: dict, json_file: str) -> None:
    """The JSON records are the means of the per-query recalls."""
    with open(json_file) as f:
        records = json.load(f)
    assert records == res['records']
    locs = list(res['per_image'][0])
    assert [(r['stage'], r['block']) for r in records] == locs
    for rec, loc in zip(records, locs):
        assert set(rec) == {
            'stage', 'block', 'keys', 'cluster', 'window', 'random'
        }
        for name in ('cluster', 'window', 'random', 'keys'):
            values = torch.cat(
                [r[loc][name].flatten() for r in res['per_image']])
            assert rec[name] == pytest.approx(float(values.double().mean()))
        for name in ('cluster', 'window', 'random'):
            assert 0 <= rec[name] <= 1 + 1e-6
        rec0 = res['per_image'][0][loc]['record']
        N = rec0.hw_shape[0] * rec0.hw_shape[1]
        if rec0.plan.num_clusters == 1:
            # A single cluster is global attention: everything is kept.
            assert rec['cluster'] == pytest.approx(1)
            assert rec['keys'] == N
        else:
            # Chance level of the random partition, about keys / N.
            assert rec['random'] == pytest.approx(rec['keys'] / N, abs=0.05)


def test_segmentation_config(tool, images, tmp_path, capsys):
    out_file = str(tmp_path / 'fig' / 'recall.png')
    json_file = str(tmp_path / 'recall.json')
    res = tool['main']([
        DEMO_SEG, *images, '--shape', '64', '80', '--out-file', out_file,
        '--json', json_file, '--query', '12', '12', '--head', '1',
        '--map-image', '1', *SEG_OPTIONS
    ])
    out = capsys.readouterr().out
    # BOAT-CSWin: FSLA in block 0 of each stage; 20x16, 10x8, 5x4, 3x2.
    assert [(r['stage'], r['block'], r['maps']) for r in res['rows']] == \
        [(0, 0, '16x20'), (1, 0, '8x10'), (2, 0, '4x5'), (3, 0, '2x3')]
    for r in res['rows']:
        line = next(
            ln for ln in out.splitlines()
            if ln.split()[:3] == [str(r['stage']),
                                  str(r['block']), r['maps']])
        assert f'{r["cluster"]:.3f} [' in line
    _check_records(res, json_file)
    # Stage 0: 320 tokens in 16 clusters of 20, plus 4 borrowed.
    assert res['records'][0]['keys'] == 24
    picture = cv2.imread(out_file)
    assert picture is not None and picture.shape[2] == 3
    shown = res['shown']
    assert shown['query'] == (3, 3)  # pixel (12, 12) at stride 4
    # The outlines are the query's FSLA keys and as many window keys.
    assert shown['cluster'].sum() == shown['window'].sum() == 24
    assert shown['cluster'][3, 3] and shown['window'][3, 3]
    assert shown['cluster_recall'] == pytest.approx(
        float(res['per_image'][1][(0, 0)]['cluster'][0, 1, 3 * 20 + 3]))


def test_classification_config_with_checkpoint(tool, images, tmp_path):
    cfg_file = tmp_path / 'tiny_swin.py'
    cfg_file.write_text(swin_classifier(SWIN_CLS))
    vis = runpy.run_path(
        osp.join(REPO, 'tools', 'visualization', 'vis_clusters.py'),
        run_name='vis')
    from mmengine.config import Config
    model = vis['build_model'](Config.fromfile(str(cfg_file)))
    ckpt = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict()}, ckpt)
    json_file = str(tmp_path / 'r.json')
    res = tool['main']([
        str(cfg_file), images[0], '--checkpoint', ckpt, '--json', json_file,
        '--shape', '64', '--block', '1', '1'
    ])
    # BOAT-Swin: FSLA in the shifted blocks of stages 0-2.
    assert [(r['stage'], r['block']) for r in res['records']] == \
        [(0, 1), (1, 1), (2, 1)]
    _check_records(res, json_file)
    assert res['shown'] is None
    # The weights were loaded: the same queries as the saved model's.
    from boat_mm.analysis import capture_fsla
    x = tool['build_pipeline'](Config.fromfile(str(cfg_file)), [64, 64])(
        dict(img_path=images[0]))
    batch = model.data_preprocessor(tool['pseudo_collate']([x]), False)
    with capture_fsla(model.backbone) as recs, torch.no_grad():
        model.backbone(batch['inputs'])
    torch.testing.assert_close(res['per_image'][0][(1, 1)]['record'].q,
                               recs[(1, 1)][0].q)


def test_detection_config(tool, images, tmp_path):
    cfg_file = tmp_path / 'tiny_retinanet.py'
    cfg_file.write_text(swin_retinanet(RETINANET) + RETINANET_PIPELINE)
    out_file = str(tmp_path / 'det.png')
    res = tool['main']([str(cfg_file), *images, '--out-file', out_file])
    # Resized to 80x64 (keep ratio within 96x64), padded to 96x64 by the
    # detector's preprocessor (size_divisor 32): a 16x24 stage-0 map.
    assert res['rows'][0]['maps'] == '16x24'
    assert [(r['stage'], r['block']) for r in res['rows']] == \
        [(0, 1), (1, 1), (2, 1)]
    assert cv2.imread(out_file) is not None


def test_max_tokens_and_errors(tool, images, tmp_path, capsys):
    # As a command: exit status 2 and one line on stderr.
    proc = subprocess.run([
        sys.executable, TOOL, DEMO_SEG, images[0], '--shape', '64', '80',
        '--max-tokens', '100', *SEG_OPTIONS
    ],
                          cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONWARNINGS='ignore'),
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count('\n') == 1
    assert proc.stderr.startswith(
        'attention_recall.py: error: img0.png: FSLA at stage 0, block 0 sees '
        'a 16x20 map (320 tokens), more than max_tokens=100'), proc.stderr
    # In-process: the same one-line manner (exit status 2).
    cases = [
        ([
            DEMO_SEG, images[0], '--shape', '32', '--block', '0', '1',
            *SEG_OPTIONS
        ], 'Stage 0, block 1 has no FSLA'),
        ([DEMO_SEG, images[0], '--shape', '32', '--head', '2',
          *SEG_OPTIONS], 'has 2 heads'),
        ([DEMO_SEG, images[0], '--map-image',
          '1'], '--map-image must index the 1 '),
        ([DEMO_SEG,
          str(tmp_path / 'missing.png')], "image '.*missing.png' not found"),
        ([DEMO_SEG, images[0], '--max-tokens', '0'], '--max-tokens must be'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            tool['main'](argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1, err
        assert err.startswith('attention_recall.py: error: '), err
        assert re.search(message, err), (message, err)


def test_unknown_window_is_one_line(tool, images, monkeypatch, capsys):
    """A family whose image-space windows the analysis does not know (here
    BOAT-CSWin's, made unknown) is a one-line error naming the fix."""
    from boat_mm.models.utils import CSWinAttention
    monkeypatch.delattr(CSWinAttention, 'window_labels')
    with pytest.raises(SystemExit) as exc:
        tool['main']([DEMO_SEG, images[0], '--shape', '32', *SEG_OPTIONS])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    assert err.startswith(
        'attention_recall.py: error: stage 0, block 0: No image-space window '
        'is known for CSWinAttention: give the class a method '
        'window_labels(hw_shape)'), err
