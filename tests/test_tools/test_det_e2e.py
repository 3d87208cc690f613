# Copyright (c) boat-mm contributors. All rights reserved.
"""End-to-end runs of the detection configs through the tools and mmdet.

Every run uses generated COCO-like data (6 + 4 images of 64 px) and a user
config that inherits the detection demo config by path with a tiny
BOAT-CSWin and 16-channel heads; training runs 4 iterations. Everything is
written under ``tmp_path``.
"""
import glob
import json
import os
import os.path as osp
import pickle
import re
import runpy
import sys

import cv2
import numpy as np
import pytest
import torch
# The same command runners as the segmentation end-to-end tests.
from test_seg_e2e import (FALLBACK_NOTE, UPSTREAM_NOISE, _ckpt, _run, _tool,
                          _tool_main, _upstream_messages, check_amp_run,
                          check_resume, tool_in_process)
from tiny_configs import swin_retinanet

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(REPO, 'configs', 'demo',
                'mask-rcnn_boat-cswin-tiny_fpn_demo.py')
RETINANET = osp.join(REPO, 'configs', 'boat_swin',
                     'retinanet_boat-swin-tiny_fpn_1x_coco.py')

# Pipelines of the user configs at 64 px (`{root}` is filled in).
PIPELINES = """
data_root = {root!r}
img_scale = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                          'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
"""
TINY_CSWIN = ("arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], "
              "num_heads=[2, 2, 2, 2], split_sizes=[1, 2, 7, 7]), "
              "drop_path_rate=0.0, fsla_cfg=dict(group_size=16, overlap=4), "
              "init_cfg=None")
MASK_RCNN_CFG = """
_base_ = [{base!r}]
model = dict(
    backbone=dict({arch}),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=16),
        bbox_head=dict(in_channels=16, fc_out_channels=32),
        mask_roi_extractor=dict(out_channels=16),
        mask_head=dict(in_channels=16, conv_out_channels=8)),
    # All anchors and proposals instead of random samples: no torch RNG in
    # the steps, so a resumed run (RNG state is not checkpointed) repeats
    # the uninterrupted one exactly.
    train_cfg=dict(
        rpn=dict(sampler=dict(_delete_=True, type='PseudoSampler')),
        rcnn=dict(sampler=dict(_delete_=True, type='PseudoSampler'))))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=4, milestones=[3])
]
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=2))
""" + PIPELINES
# The tiny RetinaNet (tiny_configs.swin_retinanet at 12 channels) on the
# generated data, with 6 of COCO's classes (`{root}` is filled in).
# Untrained: the test keeps the low scores, so that there is something to
# merge.
RETINANET_TEST_CFG = '    test_cfg=dict(score_thr=0.0),\n'
RETINANET_DATA = """
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)
metainfo = dict(
    classes=('person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus'))
""" + PIPELINES.replace('pipeline=train_pipeline)',
                        'pipeline=train_pipeline, metainfo=metainfo)').replace(
                            'pipeline=test_pipeline)',
                            'pipeline=test_pipeline, metainfo=metainfo)')


def _metrics(out: str, stage: str) -> dict:
    """``coco/*_mAP`` values of the last ``Iter(stage)`` line."""
    line = [ln for ln in out.splitlines() if f'Iter({stage})' in ln][-1]
    return {
        k: float(v)
        for k, v in re.findall(r'(coco/\w+_mAP\w*): ([\d.]+)', line)
    }


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> str:
    from boat_mm.datasets import generate_coco_like
    out = tmp_path_factory.mktemp('coco_e2e')
    return generate_coco_like(
        str(out), num_train=6, num_val=4, img_size=64, seed=1,
        progress=False) + '/'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, coco_root):
    """4 iterations of a tiny Mask R-CNN from the demo config, validated at
    the end, checkpoints at iterations 2 and 4."""
    tmp = tmp_path_factory.mktemp('det_train')
    cfg = str(tmp / 'user_mask_rcnn.py')
    with open(cfg, 'w') as f:
        f.write(
            MASK_RCNN_CFG.format(base=DEMO, arch=TINY_CSWIN, root=coco_root))
    work_dir = str(tmp / 'work')
    out = _tool('train.py', cfg, '--work-dir', work_dir, cwd=str(tmp))
    return dict(cfg=cfg, work_dir=work_dir, out=out, tmp=tmp)


def test_train_evaluates_bbox_and_segm_then_test(trained, coco_root):
    work_dir = trained['work_dir']
    assert re.search(r'Iter\(train\) \[4/4\].*loss_mask', trained['out'])
    val = _metrics(trained['out'], 'val')
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= set(val)
    ckpt = _ckpt(osp.join(work_dir, 'iter_4.pth'))
    assert ckpt['meta']['iter'] == 4
    assert ckpt['meta']['dataset_meta']['classes'][:2] == ('person', 'bicycle')

    # tools/test.py on the same checkpoint gives the same metrics, dumps
    # the predictions and draws them.
    pkl = str(trained['tmp'] / 'preds.pkl')
    out = tool_in_process(
        'test.py',
        trained['cfg'],
        osp.join(work_dir, 'iter_4.pth'),
        '--out',
        pkl,
        '--show-dir',
        'show',  # relative: inside the run's log folder (mmdet's hook)
        work_dir=str(trained['tmp'] / 'test'),
        cwd=str(trained['tmp']))
    assert _metrics(out, 'test') == val
    with open(pkl, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 4
    for pred in preds:
        inst = pred['pred_instances']
        assert len(inst['masks']) == len(inst['bboxes'])  # RLE masks
    assert not osp.exists(trained['tmp'] / 'show')
    drawn = glob.glob(str(trained['tmp'] / 'test' / '*' / 'show' / '*.jpg'))
    assert len(drawn) == 4


def test_resume_continues_interrupted_run(trained):
    """A run stopped after its iteration-2 checkpoint and resumed with
    ``--resume`` ends exactly where the uninterrupted run ended."""
    check_resume(trained, 'roi_head.mask_head.conv_logits.weight',
                 '--no-validate')


@pytest.mark.cuda
def test_amp_training_on_gpu(trained):
    """Mixed precision on the GPU: FSLA's Triton kernels, RoIAlign and the
    mask head in float16 under MMEngine's AmpOptimWrapper."""
    check_amp_run(trained, 'loss_mask', r'Iter\(val\) \[2/2\].*segm_mAP')


def test_upstream_mmdet_train_tool_runs_our_config(trained):
    """mmdet's own tools/train.py (shipped in the wheel) needs nothing but
    the config's ``custom_imports``."""
    import mmdet
    tool = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    assert osp.isfile(tool)
    work_dir = str(trained['tmp'] / 'upstream')
    out = _run([
        sys.executable, tool, trained['cfg'], '--work-dir', work_dir,
        '--cfg-options', 'train_cfg.max_iters=2', 'val_cfg=None',
        'val_dataloader=None', 'val_evaluator=None'
    ],
               cwd=str(trained['tmp']))
    assert re.search(r'Iter\(train\) \[2/2\].*loss_mask', out)
    assert _ckpt(osp.join(work_dir, 'iter_2.pth'))['meta']['iter'] == 2


def test_det_inferencer_returns_masks(trained, coco_root):
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(
        model=trained['cfg'],
        weights=osp.join(trained['work_dir'], 'iter_4.pth'),
        device='cpu',
        show_progress=False)
    image = osp.join(coco_root, 'val2017', '000000000001.jpg')
    result = inferencer(image, return_datasamples=True)
    pred = result['predictions'][0].pred_instances
    assert len(pred) > 0
    assert pred.masks.shape == (len(pred), 64, 64)
    assert pred.masks.dtype == torch.bool


def test_image_demo_counts_the_detections(trained, coco_root, tmp_path,
                                          capsys):
    """tools/image_demo.py on what training left in its work dir (the
    dumped config and a checkpoint): the detections scoring above
    --pred-score-thr are those of mmdet's own inference_detector, counted
    per class of the checkpoint's classes, and drawn over the image."""
    from mmdet.apis import inference_detector, init_detector
    ckpt = osp.join(trained['work_dir'], 'iter_4.pth')
    image = osp.join(coco_root, 'val2017', '000000000002.jpg')
    model = init_detector(trained['cfg'], ckpt, device='cpu')
    ref = inference_detector(model, image).pred_instances
    scores = ref.scores.sort(descending=True).values
    assert len(scores) > 3
    # Between the 3rd and 4th best: three kept, far from a near-tie.
    thr = float(scores[2] + scores[3]) / 2
    assert scores[2] - scores[3] > 1e-4
    # mmdet demo's spelling of the checkpoint and the output.
    out_file = str(tmp_path / 'vis' / osp.basename(image))
    dumped = osp.join(trained['work_dir'], osp.basename(trained['cfg']))
    # In this process (its command line is test_cli_manner.py's).
    with _upstream_messages() as messages:
        _tool_main('image_demo.py')([
            image, dumped, '--weights', ckpt, '--pred-score-thr',
            str(thr), '--out-dir',
            str(tmp_path)
        ])
    out = capsys.readouterr().out
    assert not [m for m in messages if re.search(UPSTREAM_NOISE, m)]
    classes = _ckpt(ckpt)['meta']['dataset_meta']['classes']
    kept = ref.labels[ref.scores > thr].tolist()
    counts = {classes[c]: kept.count(c) for c in set(kept)}
    line = re.search(
        r': (\d+) detections score above [\d.e-]+ \(of (\d+)\)'
        r'(?:: (.*))?$', out, re.M)
    assert line, out[-2000:]
    assert (int(line[1]), int(line[2])) == (3, len(scores))
    printed = dict(
        re.match(r'(.+) (\d+)$', part).groups()
        for part in line[3].split(', '))
    assert {k: int(v) for k, v in printed.items()} == counts
    drawn = cv2.imread(out_file)
    assert drawn.shape == cv2.imread(image).shape
    assert (drawn != cv2.imread(image)).any()


def test_image_demo_without_class_names_in_the_checkpoint(
        trained, coco_root, tmp_path):
    """A checkpoint without meta (a bare state_dict): the detections are
    named by the classes of the config's test dataset (the generated
    data's, which training saved), not by mmdet's COCO fallback, and
    mmdet's warning about that fallback is not shown."""
    ckpt = _ckpt(osp.join(trained['work_dir'], 'iter_4.pth'))
    classes = ckpt['meta']['dataset_meta']['classes']
    assert len(classes) < 80  # not COCO's
    bare = str(tmp_path / 'bare.pth')
    torch.save(dict(state_dict=ckpt['state_dict']), bare)
    image = osp.join(coco_root, 'val2017', '000000000002.jpg')
    with _upstream_messages() as messages:
        res = _tool_main('image_demo.py')([
            image, trained['cfg'], '--checkpoint', bare, '--pred-score-thr',
            '0', '--out-file',
            str(tmp_path / 'bare.png')
        ])
    assert any('Class names of the config' in m for m in messages)
    assert not [m for m in messages if re.search(FALLBACK_NOTE, m)]
    assert not [m for m in messages if re.search(UPSTREAM_NOISE, m)]
    labels = res['instances'].labels[res['kept']].tolist()
    assert labels
    assert res['counts'] == {classes[c]: labels.count(c) for c in set(labels)}


def test_show_dir_interval_draws_every_nth_sample(trained, coco_root,
                                                  tmp_path):
    """--interval 3: samples 0 and 3 of the 4 (batches of 2) are drawn, as
    for mmpretrain configs; mmdet's own hook ignores its interval when
    testing and would draw all four."""
    # In this process MMEngine's visualizer named 'visualizer' may be that
    # of another scope's in-process run (the hooks take the current one).
    with open(osp.join(coco_root, 'annotations',
                       'instances_val2017.json')) as f:
        names = [img['file_name'] for img in json.load(f)['images']]
    show_dir = str(tmp_path / 'show')
    _tool_main('test.py')([
        trained['cfg'],
        osp.join(trained['work_dir'], 'iter_4.pth'), '--show-dir', show_dir,
        '--interval', '3', '--work-dir',
        str(tmp_path / 'work'), '--cfg-options', 'visualizer.name=det_interval'
    ])
    assert sorted(os.listdir(show_dir)) == sorted([names[0], names[3]])


def test_vis_clusters_of_a_detector(trained, coco_root, tmp_path):
    out_file = str(tmp_path / 'clusters.png')
    res = _tool_main('visualization/vis_clusters.py')([
        trained['cfg'],
        osp.join(coco_root, 'val2017', '000000000002.jpg'), '--checkpoint',
        osp.join(trained['work_dir'], 'iter_4.pth'), '--stage', '1',
        '--out-file', out_file
    ])
    # Stage 1 of a 64 px image: 8 x 8 tokens, 4 clusters of 16.
    assert res['ids'].shape == (8, 8)
    assert sorted(np.bincount(res['ids'].ravel())) == [16] * 4
    assert osp.isfile(out_file)


def test_tta_and_out_checks(trained, coco_root, tmp_path):
    """--tta: boxes only (mmdet's DetTTAModel does not merge masks), and
    flip TTA of a RetinaNet; --out must be a pickle file."""
    ckpt = osp.join(trained['work_dir'], 'iter_4.pth')
    test = _tool_main('test.py')
    with pytest.raises(ValueError, match='merges boxes only'):
        test([trained['cfg'], ckpt, '--tta'])
    with pytest.raises(ValueError, match=r'\.pkl or \.pickle'):
        test([trained['cfg'], ckpt, '--out', str(tmp_path / 'x.json')])

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg_path = str(tmp_path / 'user_retinanet.py')
    with open(cfg_path, 'w') as f:
        f.write(
            swin_retinanet(RETINANET, 12, RETINANET_TEST_CFG) +
            RETINANET_DATA.format(root=coco_root))
    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(cfg_path).model)
    retina_ckpt = str(tmp_path / 'retinanet.pth')
    torch.save(dict(state_dict=model.state_dict()), retina_ckpt)
    metrics = test(
        [cfg_path, retina_ckpt, '--tta', '--work-dir',
         str(tmp_path / 'tta')])
    assert 'coco/bbox_mAP' in metrics


def test_backbone_same_under_mmdet_and_mmseg_scopes():
    """One BOAT type builds from mmdet's and mmseg's registries; the same
    weights give the same features, at a detection-like odd size."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS
    cfg = dict(
        type='BOATSwin',
        arch=dict(embed_dims=12, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2]),
        fsla_cfg=dict(group_size=16, overlap=4))
    with DefaultScope.overwrite_default_scope('mmdet'):
        det = DET_MODELS.build(cfg)
    with DefaultScope.overwrite_default_scope('mmseg'):
        seg = SEG_MODELS.build(cfg)
    assert type(det) is type(seg)
    gen = torch.Generator().manual_seed(0)
    state = {
        k:
        torch.randn(v.shape, generator=gen) *
        0.1 if v.is_floating_point() else v
        for k, v in det.state_dict().items()
    }
    det.load_state_dict(state)
    seg.load_state_dict(state)
    x = torch.randn(1, 3, 101, 167, generator=gen)
    with torch.no_grad():
        feats = det.eval()(x), seg.eval()(x)
    assert [tuple(f.shape[-2:]) for f in feats[0]] == [(26, 42), (13, 21),
                                                       (7, 11), (4, 6)]
    for a, b in zip(*feats):
        assert torch.equal(a, b)


def test_get_flops_of_detectors(trained):
    """Whole-detector counts: the backbone's share equals the backbone
    counted alone; RoI heads on 1000 proposals add a fixed amount."""
    from boat_mm.analysis.complexity import get_model_complexity
    count = runpy.run_path(
        osp.join(REPO, 'tools', 'analysis_tools', 'get_flops.py'),
        run_name='boat_tool')['count_config']
    info = count(trained['cfg'], (64, 96))
    detector = info['model'].detector
    alone = get_model_complexity(detector.backbone, (3, 64, 96))
    by_module = info['analyzer'].by_module()
    assert by_module['detector.backbone'] == alone['flops']
    assert info['params'] == sum(p.numel() for p in detector.parameters())
    # Shared2FCBBoxHead: fc 16*7*7 -> 32 -> 32, then cls (7) and reg
    # (6 * 4) on 1000 RoIs.
    bbox_head = 1000 * (16 * 49 * 32 + 32 * 32 + 32 * 7 + 32 * 24)
    assert by_module['detector.roi_head.bbox_head'] == bbox_head
    assert info['flops'] > alone['flops'] + bbox_head


def test_missing_coco_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/coco here
    config = osp.join(REPO, 'configs', 'boat_swin',
                      'mask-rcnn_boat-swin-tiny_fpn_1x_coco.py')
    with pytest.raises(FileNotFoundError) as err:
        _tool_main('train.py')([config, '--work-dir', str(tmp_path / 'w')])
    msg = str(err.value)
    assert "'data/coco/' does not exist" in msg
    assert 'gen_synthetic_data.py coco' in msg
    # What a full config needs on the generated data besides its paths.
    assert 'metainfo.classes' in msg and 'num_classes' in msg


def test_publish_model_of_a_detector(trained, tmp_path):
    """publish_model.py on a Mask R-CNN checkpoint: the same weights and
    dataset_meta (COCO-like classes and palette), loadable weights-only,
    without the training state."""
    tool = runpy.run_path(
        osp.join(REPO, 'tools', 'model_converters', 'publish_model.py'),
        run_name='boat_tool')
    src = osp.join(trained['work_dir'], 'iter_4.pth')
    path = tool['publish'](src, str(tmp_path / 'det.pth'))
    assert re.fullmatch(r'det-[0-9a-f]{8}\.pth', osp.basename(path))
    pub, ref = _ckpt(path), _ckpt(src)
    assert 'optimizer' in ref and set(pub) == {'state_dict', 'meta'}
    assert pub['meta']['dataset_meta'] == ref['meta']['dataset_meta']
    assert list(pub['state_dict']) == list(ref['state_dict'])
    for k, v in ref['state_dict'].items():
        assert torch.equal(pub['state_dict'][k], v), k
