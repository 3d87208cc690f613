# Copyright (c) boat-mm contributors. All rights reserved.
"""End-to-end runs of the classification configs through the tools.

Every run uses the generated ImageNet-like data (6 classes, 3 + 2 images
per class, 32 px, through the configs' own 224 px pipelines), a tiny BOAT
arch swapped in by a user-style config that inherits ours by path, and two
epochs of 9 iterations (warm-up epoch, then cosine, as the recipes).
Everything is written under ``tmp_path``.
"""
import glob
import hashlib
import importlib.util
import json
import math
import os
import os.path as osp
import pickle
import pickletools
import re
import runpy
import shutil
import sys
import zipfile
from typing import List, Optional

import cv2
import mmengine
import mmpretrain
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
# The command runners of the segmentation end-to-end tests.
from test_seg_e2e import _ckpt
from test_seg_e2e import _run as run
from test_seg_e2e import _tool as tool
from test_seg_e2e import _tool_main, tool_in_process

import boat_mm

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_16xb64_in1k.py')
CSWIN_T = osp.join(REPO, 'configs', 'boat_cswin',
                   'boat-cswin-tiny_8xb256_in1k.py')

# A user's config: inherits one of ours by absolute path, swaps in a tiny
# arch, 6 classes and the generated data. `{base}`, `{root}`, `{arch}` and
# `{channels}` are filled in. The recipe's pipelines, optimizer, mixup /
# cutmix, label smoothing and hooks (EMA for BOAT-CSWin) stay.
USER_CFG = """
_base_ = [{base!r}]
data_root = {root!r}
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, {arch}),
        drop_path_rate=0.0,
        fsla_cfg=dict(group_size=16, overlap=4)),
    head=dict(in_channels={channels}, num_classes=6))
data_preprocessor = dict(num_classes=6)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
# The recipes' 20 warm-up epochs then cosine, shrunk to 1 + 1 epochs.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1,
         end=2)
]
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
"""
SWIN_ARCH = dict(
    arch='embed_dims=8, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2]',
    channels=64)
CSWIN_ARCH = dict(
    arch='embed_dims=8, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2]',
    channels=64)
NUM_VAL = 12  # 6 classes x 2 images
ITERS_PER_EPOCH = 9  # 18 images, batch 2
VAL_RE = (r'Epoch\(val\) \[2\]\[6/6\]\s+accuracy/top1: ([\d.]+)\s+'
          r'accuracy/top5: ([\d.]+)')
TEST_RE = r'Epoch\(test\) \[6/6\]\s+accuracy/top1: ([\d.]+)'


def _user_cfg(path: str, base: str, root: str, arch: dict) -> str:
    with open(path, 'w') as f:
        f.write(USER_CFG.format(base=base, root=root, **arch))
    return path


# One thread: on the shared 2-core machine OpenMP threads that wait for
# each other make these small runs several times slower.
ONE_THREAD = dict(OMP_NUM_THREADS='1')


def _run(cmd: List[str], cwd: str, env: Optional[dict] = None) -> str:
    return run(cmd, cwd, dict(ONE_THREAD, **(env or {})))


def _tool(name: str, *args: str, cwd: str) -> str:
    return tool(name, *args, cwd=cwd, env=ONE_THREAD)


def _train(tmp, base: str, root: str, arch: dict) -> dict:
    """tools/train.py's main in this process (its command line in a fresh
    process: test_simmim_pretraining_then_fine_tuning, and the seg and
    det runs)."""
    cfg = _user_cfg(str(tmp / 'user.py'), base, root, arch)
    work_dir = str(tmp / 'work')
    out = tool_in_process('train.py', cfg, work_dir=work_dir, cwd=str(tmp))
    val = re.search(VAL_RE, out)
    assert val, out[-3000:]
    return dict(
        cfg=cfg, work_dir=work_dir, out=out, tmp=tmp, val_top1=float(val[1]))


@pytest.fixture(scope='module')
def trained_swin(tmp_path_factory, imagenet_root):
    """Two epochs of the BOAT-Swin-T recipe with a tiny arch, validated at
    the end, a checkpoint per epoch."""
    return _train(
        tmp_path_factory.mktemp('cls_swin'), SWIN_T, imagenet_root, SWIN_ARCH)


@pytest.fixture(scope='module')
def trained_cswin(tmp_path_factory, imagenet_root):
    """The same with the BOAT-CSWin-T recipe (EMA of the weights)."""
    return _train(
        tmp_path_factory.mktemp('cls_cswin'), CSWIN_T, imagenet_root,
        CSWIN_ARCH)


def test_swin_train_val_then_test_with_tta(trained_swin):
    out, work_dir = trained_swin['out'], trained_swin['work_dir']
    # The LR reaches its peak at the end of the warm-up epoch.
    assert re.search(r'Epoch\(train\) \[1\]\[9/9\].*lr: 1\.0000e-03.*loss',
                     out)
    assert re.search(r'Epoch\(train\) \[2\]\[9/9\].*loss', out)
    for epoch in (1, 2):
        assert osp.isfile(osp.join(work_dir, f'epoch_{epoch}.pth'))
    ckpt = _ckpt(osp.join(work_dir, 'epoch_2.pth'))
    assert ckpt['meta']['epoch'] == 2
    assert ckpt['meta']['iter'] == 2 * ITERS_PER_EPOCH
    state = ckpt['state_dict']
    assert state['head.fc.weight'].shape == (6, 64)
    assert any('.fsla.' in k for k in state)

    # The checkpoint loads, strictly, into the model the config builds.
    cfg = Config.fromfile(trained_swin['cfg'])
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    model.load_state_dict(state, strict=True)

    # Flip TTA (mmpretrain's AverageClsScoreTTA) and the predictions.
    preds = str(trained_swin['tmp'] / 'preds.pkl')
    out = tool_in_process(
        'test.py',
        trained_swin['cfg'],
        osp.join(work_dir, 'epoch_2.pth'),
        '--tta',
        '--out',
        preds,
        work_dir=str(trained_swin['tmp'] / 'test'),
        cwd=str(trained_swin['tmp']))
    assert 'AverageClsScoreTTA' in out
    assert 'do not match exactly' not in out  # the checkpoint fitted
    top1 = float(re.search(TEST_RE, out)[1])
    with open(preds, 'rb') as f:
        samples = pickle.load(f)
    assert len(samples) == NUM_VAL
    assert all(s['pred_score'].shape == (6, ) for s in samples)
    hits = [int(s['pred_label']) == int(s['gt_label']) for s in samples]
    assert top1 == pytest.approx(100 * sum(hits) / NUM_VAL, abs=1e-3)


def test_cswin_ema_checkpoint_and_test(trained_cswin):
    out, work_dir = trained_cswin['out'], trained_cswin['work_dir']
    assert 'EMAHook' in out
    ckpt1 = _ckpt(osp.join(work_dir, 'epoch_1.pth'))
    ckpt2 = _ckpt(osp.join(work_dir, 'epoch_2.pth'))
    # MMEngine's EMAHook stores the averaged weights as `state_dict` (what
    # deployment loads) and the trained ones under `ema_state_dict`.
    ema = ckpt2['ema_state_dict']
    assert int(ema['steps']) == 2 * ITERS_PER_EPOCH
    key = 'backbone.patch_embed.projection.weight'
    avg1, avg2 = ckpt1['state_dict'][key], ckpt2['state_dict'][key]
    raw1 = ckpt1['ema_state_dict']['module.' + key]
    raw2 = ema['module.' + key]
    assert set(ckpt2['state_dict']) == {
        k[len('module.'):]
        for k in ema if k != 'steps'
    }
    # Momentum 1.6e-4 per step: the average barely moves while the trained
    # weights do.
    raw_step = (raw2 - raw1).abs().max()
    assert raw_step > 0
    assert (avg2 - avg1).abs().max() < 0.01 * raw_step
    assert not torch.allclose(avg2, raw2)

    # Testing the checkpoint gives what the EMA weights got in validation.
    metrics = str(trained_cswin['tmp'] / 'metrics.json')
    out = tool_in_process(
        'test.py',
        trained_cswin['cfg'],
        osp.join(work_dir, 'epoch_2.pth'),
        '--out',
        metrics,
        '--out-item',
        'metrics',
        work_dir=str(trained_cswin['tmp'] / 'test'),
        cwd=str(trained_cswin['tmp']))
    assert 'do not match exactly' not in out
    top1 = float(re.search(TEST_RE, out)[1])
    assert top1 == pytest.approx(trained_cswin['val_top1'])
    dumped = mmengine.load(metrics)
    assert set(dumped) == {'accuracy/top1', 'accuracy/top5'}
    assert dumped['accuracy/top1'] == pytest.approx(top1, abs=1e-3)


def _ema_shares(hook, total: int, per_epoch: int) -> np.ndarray:
    """What MMEngine's ``EMAHook`` averages: the model's weights at the
    end of the run as shares of the weights after each iteration (the
    model's weight is the iteration's basis vector)."""
    from types import SimpleNamespace
    model = torch.nn.Linear(total, 1, bias=False)
    runner = SimpleNamespace(model=model, iter=0, epoch=0)
    hook.before_run(runner)
    for i in range(total):
        with torch.no_grad():
            model.weight.copy_(torch.eye(total)[i])
        runner.iter, runner.epoch = i, i // per_epoch
        hook.after_train_iter(runner, i % per_epoch)
    return hook.ema_model.module.weight[0].detach().double().numpy()


def _ema_note(hook, total: int, per_epoch: int) -> Optional[str]:
    """train.py's warning for ``hook`` in a run of ``total`` iterations."""
    from types import SimpleNamespace

    from boat_tools.hooks import ema_start_note
    loop = SimpleNamespace(max_iters=total, dataloader=[None] * per_epoch)
    return ema_start_note(SimpleNamespace(hooks=[hook], train_loop=loop))


def _kept(note: str) -> float:
    """The share of the first weights a warning of train.py names."""
    return float(re.search(r'leaves ([\d.]+)% of the averaged', note)[1]) / 100


def test_cswin_short_run_warns_of_its_ema(trained_cswin):
    """The recipe's momentum over a run of 18 iterations keeps nearly all
    of the first weights: train.py says so, with the share and a momentum
    that keeps 1 %, both checked on MMEngine's own average."""
    from mmengine.hooks import EMAHook
    total = 2 * ITERS_PER_EPOCH
    first = _ema_shares(EMAHook(momentum=1.6e-4), total, ITERS_PER_EPOCH)[0]
    line, = [
        ln for ln in trained_cswin['out'].splitlines() if 'EMAHook: ' in ln
    ]
    assert 'WARNING' in line
    assert (f'EMAHook: momentum=0.00016 (the weight of the model in each '
            f"update of the average, as MMEngine's ExponentialMovingAverage "
            f"defines it) over the 18 of this run's 18 iterations it "
            f'averages (17 updates) leaves {100 * first:.1f}% of the '
            f'averaged parameters at the weights after the first '
            f'iteration') in line
    assert (
        "validation, the checkpoints' state_dict and test.py use the "
        'averaged weights: for a run this short, remove the hook '
        '(`custom_hooks = []`) or set a momentum that keeps little of them, '
        'e.g. momentum=') in line
    better = float(re.search(r'e\.g\. momentum=([\d.]+) keeps 1%', line)[1])
    shares = _ema_shares(EMAHook(momentum=better), total, ITERS_PER_EPOCH)
    assert shares[0] == pytest.approx(0.01, rel=0.02)


@pytest.mark.parametrize(
    'args, warns',
    [
        # The share of the weights after iteration 4 (begin_iter - 1 on).
        (dict(momentum=0.02, begin_iter=4), True),
        (dict(momentum=0.02, begin_epoch=2, update_buffers=True), True),
        (dict(momentum=0.05, interval=3), True),
        (dict(momentum=0.1), False),
    ])
def test_ema_note_counts_as_mmengine(args, warns):
    """The share train.py names is what MMEngine's hook leaves, from
    begin_iter or begin_epoch on, every interval iterations."""
    from mmengine.hooks import EMAHook
    total, per_epoch = 24, 6
    shares = _ema_shares(EMAHook(**args), total, per_epoch)
    start = np.flatnonzero(shares)[0]
    note = _ema_note(EMAHook(**args), total, per_epoch)
    assert (note is not None) == warns, note
    assert warns == (shares[start] > 0.5)
    if warns:
        assert _kept(note) == pytest.approx(shares[start], abs=6e-4)
        at = ('the first iteration'
              if start == 0 else f'iteration {start + 1}')
        assert f'at the weights after {at}' in note


def test_cswin_ema_checkpoint_with_tta(trained_cswin):
    """Flip TTA of a checkpoint written with the EMA hook scores the
    averaged weights: the predictions equal those of the same test
    without the hook, where the checkpoint's `state_dict` (the averaged
    weights) is what loads."""
    ckpt = osp.join(trained_cswin['work_dir'], 'epoch_2.pth')
    scores = {}
    for name, extra in (('hook', []), ('plain',
                                       ['--cfg-options', 'custom_hooks=[]'])):
        preds = str(trained_cswin['tmp'] / f'tta_{name}.pkl')
        out = tool_in_process(
            'test.py',
            trained_cswin['cfg'],
            ckpt,
            '--tta',
            '--out',
            preds,
            *extra,
            work_dir=str(trained_cswin['tmp'] / f'tta_{name}'),
            cwd=str(trained_cswin['tmp']))
        assert 'AverageClsScoreTTA' in out
        assert ('TTAEMAHook' in out) == (name == 'hook'), out[-3000:]
        with open(preds, 'rb') as f:
            scores[name] = torch.stack(
                [s['pred_score'] for s in pickle.load(f)])
    assert scores['hook'].shape == (NUM_VAL, 6)
    torch.testing.assert_close(scores['hook'], scores['plain'])


@pytest.mark.skipif(
    importlib.util.find_spec('seaborn') is None,
    reason='seaborn is not installed: pip install -r '
    'requirements/optional.txt')
def test_analyze_logs_plots_the_training_loss(trained_swin, tmp_path,
                                              monkeypatch):
    """mmpretrain's analyze_logs.py plot_curve on the run's
    ``vis_data/scalars.json``, as docs/upstream_tools.md runs it: the
    curve drawn is the loss logged at every iteration (read here from the
    file), against epochs, in seaborn's style."""
    import matplotlib.pyplot as plt
    scalars, = glob.glob(
        osp.join(trained_swin['work_dir'], '*', 'vis_data', 'scalars.json'))
    with open(scalars) as f:
        train = [r for r in map(json.loads, f) if 'loss' in r]
    assert len(train) == 2 * ITERS_PER_EPOCH  # logger interval 1
    drawn = []
    save = plt.savefig

    def savefig_kept(*args, **kwargs):
        drawn.extend(line.get_xydata() for line in plt.gca().lines)
        drawn.append(plt.rcParams['axes.grid'])  # seaborn's whitegrid
        return save(*args, **kwargs)

    monkeypatch.setattr(plt, 'savefig', savefig_kept)
    out = str(tmp_path / 'loss.png')
    tool = osp.join(
        osp.dirname(mmpretrain.__file__), '.mim', 'tools', 'analysis_tools',
        'analyze_logs.py')
    monkeypatch.setattr(
        sys, 'argv',
        [tool, 'plot_curve', scalars, '--keys', 'loss', '--out', out])
    assert not plt.rcParams['axes.grid']  # matplotlib's default
    with plt.rc_context():  # the style the tool sets is undone after
        runpy.run_path(tool, run_name='__main__')
    curve, grid = drawn
    assert grid
    steps_per_epoch = train[-1]['step'] / train[-1]['epoch']
    np.testing.assert_allclose(curve, [(r['step'] / steps_per_epoch, r['loss'])
                                       for r in train])
    assert cv2.imread(out).shape == (700, 1200, 3)  # --window-size 12*7


def test_image_demo_lists_the_top_classes(trained_swin, imagenet_root, capsys):
    """tools/image_demo.py IMG CONFIG --checkpoint CKPT: the printed top-3
    classes and scores are the softmax of the model's own forward on the
    config's test pipeline, named by the checkpoint's classes; the 32 px
    image is drawn at 224 px."""
    from mmengine.dataset import Compose, pseudo_collate
    tmp = trained_swin['tmp']
    ckpt = osp.join(trained_swin['work_dir'], 'epoch_2.pth')
    image = sorted(
        glob.glob(osp.join(imagenet_root, 'val', 'class_002', '*')))[0]
    out_file = str(tmp / 'demo.png')
    # In this process (its command line is test_cli_manner.py's).
    _tool_main('image_demo.py')([
        image, trained_swin['cfg'], '--checkpoint', ckpt, '--topk', '3',
        '--out-file', out_file
    ])
    out = capsys.readouterr().out

    cfg = Config.fromfile(trained_swin['cfg'])
    init_default_scope('mmpretrain')
    model = MODELS.build(
        dict(cfg.model, data_preprocessor=cfg.data_preprocessor))
    saved = _ckpt(ckpt)
    model.load_state_dict(saved['state_dict'])
    data = Compose(cfg.test_dataloader.dataset.pipeline)(dict(img_path=image))
    with torch.no_grad():
        batch = model.data_preprocessor(pseudo_collate([data]), False)
        scores = model.eval()(batch['inputs'], mode='tensor').softmax(-1)[0]
    top = scores.topk(3)
    classes = saved['meta']['dataset_meta']['classes']
    printed = re.findall(r'^  ([\d.]+)  (.+) \((\d+)\)$', out, re.M)
    assert [int(label) for _, _, label in printed] == top.indices.tolist()
    assert [name for _, name, _ in printed
            ] == [classes[i] for i in top.indices.tolist()]
    for (score, _, _), ref in zip(printed, top.values.tolist()):
        assert float(score) == pytest.approx(ref, abs=6e-4)
    assert cv2.imread(out_file).shape == (224, 224, 3)


def test_image_demo_without_class_names_in_the_checkpoint(
        trained_swin, imagenet_root, capsys):
    """A checkpoint without meta (a bare state_dict): the classes are named
    by the config's test dataset (here its metainfo, as a user's config
    declares the generated data's classes), not by the dataset type's
    (ImageNet's), which mmpretrain's inferencer would take."""
    tmp = trained_swin['tmp']
    saved = _ckpt(osp.join(trained_swin['work_dir'], 'epoch_2.pth'))
    bare = str(tmp / 'bare_cls.pth')
    torch.save(dict(state_dict=saved['state_dict']), bare)
    classes = [f'c{i}' for i in range(6)]
    image = sorted(
        glob.glob(osp.join(imagenet_root, 'val', 'class_002', '*')))[0]
    _tool_main('image_demo.py')([
        image, trained_swin['cfg'], '--checkpoint', bare, '--topk', '2',
        '--out-file',
        str(tmp / 'bare_cls.png'), '--cfg-options',
        f'test_dataloader.dataset.metainfo.classes=[{",".join(classes)}]'
    ])
    printed = re.findall(r'^  ([\d.]+)  (.+) \((\d+)\)$',
                         capsys.readouterr().out, re.M)
    assert len(printed) == 2
    assert [name for _, name, _ in printed
            ] == [classes[int(label)] for _, _, label in printed]


def test_image_demo_names_classes_by_the_folders_of_a_custom_dataset(
        trained_swin, imagenet_root, capsys):
    """An mmpretrain CustomDataset without classes (a user's own folder per
    class) and a checkpoint without them: the classes are the folder
    names, which the dataset finds only once it reads its data folder
    (a lazy build has none)."""
    tmp = trained_swin['tmp']
    saved = _ckpt(osp.join(trained_swin['work_dir'], 'epoch_2.pth'))
    bare = str(tmp / 'bare_custom.pth')
    torch.save(dict(state_dict=saved['state_dict']), bare)
    cfg = tmp / 'custom_dataset.py'
    cfg.write_text(f'_base_ = [{trained_swin["cfg"]!r}]\n'
                   'test_dataloader = dict(dataset=dict(_delete_=True, '
                   f"type='CustomDataset', data_root={imagenet_root!r}, "
                   "data_prefix='val', pipeline={{_base_.test_pipeline}}))\n")
    folders = sorted(os.listdir(osp.join(imagenet_root, 'val')))
    image = sorted(glob.glob(osp.join(imagenet_root, 'val', folders[2],
                                      '*')))[0]
    _tool_main('image_demo.py')([
        image,
        str(cfg), '--checkpoint', bare, '--topk', '6', '--out-file',
        str(tmp / 'bare_custom.png')
    ])
    printed = re.findall(r'^  ([\d.]+)  (.+) \((\d+)\)$',
                         capsys.readouterr().out, re.M)
    assert len(printed) == 6
    assert [name for _, name, _ in printed
            ] == [folders[int(label)] for _, _, label in printed]


def test_missing_data_root_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/imagenet here
    for config in (SWIN_T, CSWIN_T):
        with pytest.raises(FileNotFoundError) as err:
            _tool_main('train.py')([config, '--work-dir', str(tmp_path)])
        msg = str(err.value)
        assert ("train_dataloader.dataset.data_root = 'data/imagenet' does "
                'not exist') in msg
        assert 'ImageNet-1K' in msg
        assert 'gen_synthetic_data.py imagenet' in msg
        # Without its class names, the dataset (hence the checkpoint's
        # dataset_meta, which the inferencers and visualizers show) keeps
        # ImageNet's: class_003 is predicted as 'tiger shark'.
        assert "metainfo.classes=\"['class_000'," in msg
        assert 'num_classes=6' in msg

    ckpt = tmp_path / 'model.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(
            FileNotFoundError,
            match="test_dataloader.dataset.data_root = "
            "'data/imagenet' does not exist"):
        _tool_main('test.py')([CSWIN_T, str(ckpt)])


# What train.py asks of an iteration-based run of an epoch-based recipe
# (check_train_loop, check_loop_units): the loop, the schedulers, the
# checkpoint hook and the log processor in iterations.
ITERATION_BASED = """
train_cfg = dict(_delete_=True, by_epoch=False, max_iters=4, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, end=2),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=2,
         end=4)
]
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=2))
log_processor = dict(by_epoch=False)
"""


def test_iteration_based_run_of_an_epoch_based_recipe(tmp_path, imagenet_root):
    """The child config train.py's messages ask for trains by iterations
    throughout: the learning rate follows the schedule (an epoch-based
    scheduler would hold it at its first value), checkpoints are saved
    every 2 iterations (an epoch-based hook saves only at the end) and the
    log counts iterations."""
    cfg = _user_cfg(
        str(tmp_path / 'user.py'), SWIN_T, imagenet_root, SWIN_ARCH)
    with open(cfg, 'a') as f:
        f.write(ITERATION_BASED)
        # An EMA that 3 updates of 0.25 leave 42 % of the first weights
        # in: no warning (test_cswin_short_run_warns_of_its_ema).
        f.write("custom_hooks = [dict(type='EMAHook', momentum=0.25)]\n")
    work_dir = str(tmp_path / 'work')
    out = tool_in_process(
        'train.py', cfg, work_dir=work_dir, cwd=str(tmp_path))
    assert 'EMAHook' in out and 'EMAHook: ' not in out
    lrs = [
        float(lr) for lr in re.findall(
            r'Iter\(train\) \[\d/4\]\s+base_lr: [\d.e+-]+ lr: ([\d.e+-]+)',
            out)
    ]
    assert len(lrs) == 4, out[-3000:]
    # The recipe's learning rate, from a thousandth of it (the warm-up).
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] > lrs[0], lrs
    assert lrs[2] == pytest.approx(1e-3) and lrs[3] < lrs[2], lrs
    assert re.search(r'Iter\(val\) \[6/6\]\s+accuracy/top1', out)
    assert sorted(
        osp.basename(p) for p in glob.glob(osp.join(work_dir, '*.pth'))) == [
            'iter_2.pth', 'iter_4.pth'
        ]


def test_upstream_mmpretrain_train_runs_our_config(tmp_path, imagenet_root):
    # mmpretrain's own tools/train.py (shipped in its wheel) knows nothing
    # of boat_mm: the config's custom_imports must register the backbone.
    import mmpretrain
    tool = osp.join(
        osp.dirname(mmpretrain.__file__), '.mim', 'tools', 'train.py')
    assert osp.isfile(tool)
    cfg = _user_cfg(
        str(tmp_path / 'user.py'), SWIN_T, imagenet_root, SWIN_ARCH)
    work_dir = str(tmp_path / 'work')
    out = _run([
        sys.executable, tool, cfg, '--work-dir', work_dir, '--cfg-options',
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'
    ],
               cwd=str(tmp_path))
    assert re.search(r'Epoch\(train\) \[1\]\[9/9\].*loss', out)
    assert re.search(r'Epoch\(val\) \[1\]\[6/6\]\s+accuracy/top1', out)
    state = _ckpt(osp.join(work_dir, 'epoch_1.pth'))['state_dict']
    assert any('.fsla.' in k for k in state)


def _publish_tool() -> dict:
    """The globals of tools/model_converters/publish_model.py."""
    return runpy.run_path(
        osp.join(REPO, 'tools', 'model_converters', 'publish_model.py'),
        run_name='boat_tool')


def _sha8(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:8]


def _pickled_globals(path: str) -> set:
    """The ``module.name`` of every global the pickle of a torch.save
    file (zip format) refers to, read without loading it."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith('data.pkl'))
        data = archive.read(name)
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == 'GLOBAL':
            found.add(arg.replace(' ', '.'))
        elif op.name == 'STACK_GLOBAL':
            found.add('.'.join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_publish_converted_and_bare_files(tmp_path):
    """publish_model.py keeps what boat2mm.py's meta says (``ema``) and
    takes a bare state dict, as MMEngine's loaders do."""
    publish = _publish_tool()['publish']
    weights = {'w': torch.arange(4.0), 'b': torch.ones(2)}
    converted = str(tmp_path / 'converted.pth')
    torch.save(
        dict(state_dict=weights, meta=dict(ema=True, arch='tiny')), converted)
    bare = str(tmp_path / 'bare.pth')
    torch.save(weights, bare)
    for src, ema in ((converted, True), (bare, False)):
        out = _ckpt(publish(src, str(tmp_path / 'out' / 'x.pth')))
        assert set(out) == {'state_dict', 'meta'}
        assert out['meta']['ema'] is ema
        assert out['state_dict'].keys() == weights.keys()
        for k, v in weights.items():
            assert torch.equal(out['state_dict'][k], v)


def test_publish_ema_checkpoint(trained_cswin, capsys):
    """publish_model.py on checkpoints of the BOAT-CSWin recipe (EMAHook):
    the file holds the averaged weights (the trained ones with --no-ema),
    the run's meta and nothing of the training state; its name carries its
    sha256; it loads as our checkpoints load."""
    tool = _publish_tool()
    tmp, work_dir = trained_cswin['tmp'], trained_cswin['work_dir']
    out_dir = tmp / 'published'
    pub, raw = {}, {}
    for epoch in (1, 2):
        src = osp.join(work_dir, f'epoch_{epoch}.pth')
        pub[epoch] = tool['publish'](src, str(out_dir / f'e{epoch}.pth'))
        raw[epoch] = tool['main'](
            [src, str(out_dir / f'e{epoch}_raw.pth'), '--no-ema'])
        assert raw[epoch] == 0
        raw[epoch] = glob.glob(str(out_dir / f'e{epoch}_raw-*.pth'))[0]
    for path in (*pub.values(), *raw.values()):
        name = osp.basename(path)
        assert re.fullmatch(r'e\d(_raw)?-[0-9a-f]{8}\.pth', name)
        assert name[-12:-4] == _sha8(path)

    src = _ckpt(osp.join(work_dir, 'epoch_2.pth'))
    assert {'optimizer', 'param_schedulers', 'message_hub',
            'ema_state_dict'} <= set(src)
    # weights_only=True: only tensors and plain values; no global outside
    # torch's own allow-list (boat_mm's additions are not needed).
    out, out_raw = _ckpt(pub[2]), _ckpt(raw[2])
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in (
        _pickled_globals(osp.join(work_dir, 'epoch_2.pth')))
    for path in (pub[2], raw[2]):
        assert {g.split('.')[0]
                for g in _pickled_globals(path)} <= {'torch', 'collections'}
    assert set(out) == set(out_raw) == {'state_dict', 'meta'}
    assert out['meta']['ema'] is True and out_raw['meta']['ema'] is False
    for key in ('dataset_meta', 'cfg', 'epoch', 'iter', 'mmengine_version'):
        assert out['meta'][key] == src['meta'][key]
    assert out['meta']['boat_mm_version'] == boat_mm.__version__
    # The trained weights: the `module.` entries of ema_state_dict.
    trained = {
        k[len('module.'):]: v
        for k, v in src['ema_state_dict'].items() if k.startswith('module.')
    }
    assert list(out['state_dict']) == list(src['state_dict'])
    assert set(trained) == set(out_raw['state_dict'])
    for k, v in out_raw['state_dict'].items():
        assert torch.equal(v, trained[k]), k
    for k, v in out['state_dict'].items():
        assert torch.equal(v, src['state_dict'][k]), k
    # Which of them is the average: from epoch 1 to 2 the published
    # weights barely move (momentum 1.6e-4 per step), the trained ones do.
    key = 'backbone.patch_embed.projection.weight'
    moved = (_ckpt(pub[2])['state_dict'][key] -
             _ckpt(pub[1])['state_dict'][key]).abs().max()
    moved_raw = (_ckpt(raw[2])['state_dict'][key] -
                 _ckpt(raw[1])['state_dict'][key]).abs().max()
    assert 0 < moved < 0.01 * moved_raw
    assert os.path.getsize(
        pub[2]) < 0.5 * os.path.getsize(osp.join(work_dir, 'epoch_2.pth'))

    # Publishing again gives the same file; another file under that name
    # is refused.
    capsys.readouterr()
    assert tool['publish'](osp.join(work_dir, 'epoch_2.pth'),
                           str(out_dir / 'e2.pth')) == pub[2]
    assert 'already this published file' in capsys.readouterr().out
    clash = str(out_dir / f'e1-{_sha8(pub[2])}.pth')
    shutil.copy(pub[1], clash)
    with pytest.raises(SystemExit) as exc:
        tool['main'](
            [osp.join(work_dir, 'epoch_2.pth'),
             str(out_dir / 'e1.pth')])
    assert exc.value.code == 2
    assert 'exists and differs' in capsys.readouterr().err

    # Loading: a backbone (init_cfg with prefix) and mmpretrain's get_model.
    cfg = Config.fromfile(trained_cswin['cfg'])
    init_default_scope('mmpretrain')
    backbone = MODELS.build(
        dict(
            cfg.model.backbone,
            init_cfg=dict(
                type='Pretrained', checkpoint=pub[2], prefix='backbone.')))
    backbone.init_weights()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, out['state_dict']['backbone.' + k]), k
    from mmpretrain import get_model
    model = get_model(cfg, pretrained=raw[2])
    assert model._dataset_meta == src['meta']['dataset_meta']
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k

    # tools/test.py (in this process) scores the published file as
    # validation scored the EMA weights of the run (and as it scores the
    # original checkpoint: test_cswin_ema_checkpoint_and_test).
    metrics = str(tmp / 'published_metrics.json')
    _tool_main('test.py')([
        trained_cswin['cfg'], pub[2], '--out', metrics, '--out-item',
        'metrics', '--work-dir',
        str(tmp / 'test_published')
    ])
    top1 = mmengine.load(metrics)['accuracy/top1']
    assert top1 == pytest.approx(trained_cswin['val_top1'], abs=1e-3)


SIMMIM_CSWIN_B = osp.join(
    REPO, 'configs', 'boat_cswin',
    'simmim_boat-cswin-base_8xb256-amp-coslr-100e_in1k-192px.py')
# SimMIM pre-training with the recipe's pipeline cut to 64 px crops (mask
# patches of 16: a 4 x 4 mask grid on the 16 x 16 tokens) and one epoch.
SIMMIM_USER_CFG = """
_base_ = [{base!r}]
data_root = {root!r}
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, {arch}),
        fsla_cfg=dict(group_size=16, overlap=4)),
    neck=dict(in_channels={channels}))
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='RandomResizedCrop', scale=64,
                 crop_ratio_range=(0.67, 1.0)),
            dict(type='RandomFlip', prob=0.5),
            dict(type='SimMIMMaskGenerator', input_size=64,
                 mask_patch_size=16, model_patch_size=4, mask_ratio=0.6),
            dict(type='PackInputs')
        ]))
# MMEngine's AmpOptimWrapper needs CUDA.
optim_wrapper = dict(type='OptimWrapper')
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
"""

SIMMIM_FT_CSWIN_B = osp.join(
    REPO, 'configs', 'boat_cswin',
    'boat-cswin-base_simmim-100e-pre_8xb256-coslr-100e_in1k-192px.py')
# Added to USER_CFG on the fine-tuning config: one epoch, float32.
SIMMIM_FT_USER_CFG = """
optim_wrapper = dict(type='OptimWrapper')  # AMP needs CUDA
train_cfg = dict(max_epochs=1, val_interval=1)
"""


def test_simmim_pretraining_then_fine_tuning(tmp_path, imagenet_root, capfd):
    """SimMIM pre-training of a tiny BOAT-CSWin through tools/train.py
    (mmpretrain's SimMIM on the recipe's pipeline), then the fine-tuning
    config of that SimMIM model (mmpretrain's fine-tuning recipe: layer-wise
    lr decay, 192 px) through tools/train.py from its checkpoint, as the
    config README shows: every backbone weight comes from the
    pre-training."""
    cfg = tmp_path / 'simmim.py'
    cfg.write_text(
        SIMMIM_USER_CFG.format(
            base=SIMMIM_CSWIN_B, root=imagenet_root, **CSWIN_ARCH))
    work_dir = str(tmp_path / 'work')
    out = _tool(
        'train.py', str(cfg), '--work-dir', work_dir, cwd=str(tmp_path))
    losses = [float(v) for v in re.findall(r'\bloss: ([\d.]+)', out)]
    assert len(losses) == ITERS_PER_EPOCH, out[-3000:]
    assert all(0 < v < 10 for v in losses)
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    state = torch.load(ckpt, map_location='cpu')['state_dict']
    assert 'backbone.mask_token' in state
    # Fine-tuning: the recipe's config, its checkpoint given on the
    # command line as the README says; one epoch of 192 px crops. By the
    # tool's main in this process: the fresh process of the same tool
    # and scope is the pre-training's above.
    fine = _user_cfg(
        str(tmp_path / 'fine.py'), SIMMIM_FT_CSWIN_B, imagenet_root,
        CSWIN_ARCH)
    with open(fine, 'a') as f:
        f.write(SIMMIM_FT_USER_CFG)
    out = tool_in_process(
        'train.py',
        fine,
        '--cfg-options',
        f'model.backbone.init_cfg.checkpoint={ckpt}',
        work_dir=str(tmp_path / 'fine_work'),
        cwd=str(tmp_path))
    # MMEngine logs the checkpoint's loading to the terminal only.
    assert (f'Loads checkpoint by local backend from path: {ckpt}'
            in capfd.readouterr().out)
    assert re.search(r'Epoch\(val\) \[1\]\[6/6\]\s+accuracy/top1', out), \
        out[-3000:]
    # The layer-wise lr decay ran: the first parameter group, the stem's,
    # had 0.9 ** (4 blocks + 1) of the base lr.
    base, first = map(float,
                      re.search(r'base_lr: (\S+) lr: (\S+)', out).groups())
    assert math.isclose(first / base, 0.9**5, rel_tol=1e-3)
    cfg = Config.fromfile(fine)
    cfg.model.backbone.init_cfg.checkpoint = ckpt
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    model.init_weights()
    backbone = model.backbone.state_dict()
    assert backbone.keys(
    ) == {k[len('backbone.'):]
          for k in state if k.startswith('backbone.')} - {'mask_token'}
    for key, value in backbone.items():
        assert torch.equal(value, state['backbone.' + key]), key
