# Copyright (c) boat-mm contributors. All rights reserved.
"""End-to-end runs of the segmentation configs through the tools.

Every run uses the generated ADE20K-like data (8 + 4 images of 64 px), a
tiny BOAT arch swapped in by a user-style config that inherits ours by
path, and 2-4 iterations. Everything is written under ``tmp_path``.
"""
import contextlib
import glob
import logging
import os
import os.path as osp
import re
import runpy
import shutil
import socket
import subprocess
import sys
import warnings
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np
import pytest
import torch
from repo_scripts import load_script

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HEADLINE = osp.join(REPO, 'configs', 'boat_upernet_ade20k.py')
SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_upernet_8xb2-160k_ade20k-512x512.py')

# A user's config: inherits one of ours by absolute path, swaps in a tiny
# arch and the 64 px data. `{base}`, `{root}` and `{arch}` are filled in.
USER_CFG = """
_base_ = [{base!r}]
data_root = {root!r}
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(_delete_=True, {arch}),
        drop_path_rate=0.0,
        fsla_cfg=dict(group_size=16, overlap=4),
        init_cfg=None),
    decode_head=dict(
        in_channels={channels}, channels=16, dropout_ratio=0.0),
    auxiliary_head=dict(
        in_channels={aux}, channels=8, dropout_ratio=0.0))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 64), ratio_range=(0.5, 2.0),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=2, end=6,
         by_epoch=False)
]
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2))
randomness = dict(seed=0)
"""
CSWIN_ARCH = dict(
    arch='embed_dims=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2]',
    channels=[16, 32, 64, 128],
    aux=64)
SWIN_ARCH = dict(
    arch='embed_dims=12, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2]',
    channels=[12, 24, 48, 96],
    aux=48)


def _user_cfg(path: str, base: str, root: str, arch: dict) -> str:
    with open(path, 'w') as f:
        f.write(USER_CFG.format(base=base, root=root, **arch))
    return path


def _run(cmd: List[str], cwd: str, env: Optional[dict] = None) -> str:
    """Run a command; return its output, or fail the test with it."""
    env = dict(os.environ, PYTHONWARNINGS='ignore', **(env or {}))
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True)
    if proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} exited with {proc.returncode}:\n'
                    f'{proc.stdout[-6000:]}')
    return proc.stdout


def _tool(name: str, *args: str, cwd: str, env: Optional[dict] = None) -> str:
    return _run(
        [sys.executable, osp.join(REPO, 'tools', name), *args],
        cwd=cwd,
        env=env)


def _ckpt(path: str) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, ade_root):
    """A 4-iteration run of the headline config with a tiny BOAT-CSWin,
    validated at the end, checkpoints at iterations 2 and 4."""
    tmp = tmp_path_factory.mktemp('seg_train')
    cfg = _user_cfg(str(tmp / 'user_cswin.py'), HEADLINE, ade_root, CSWIN_ARCH)
    work_dir = str(tmp / 'work')
    out = _tool('train.py', cfg, '--work-dir', work_dir, cwd=str(tmp))
    return dict(cfg=cfg, work_dir=work_dir, out=out, tmp=tmp)


def test_train_val_then_test_with_tta(trained, ade_root):
    work_dir = trained['work_dir']
    assert osp.isfile(osp.join(work_dir, 'iter_4.pth'))
    # Training logged losses and validated once, at the end.
    assert re.search(r'Iter\(train\) \[4/4\].*decode\.loss_ce', trained['out'])
    assert re.search(r'Iter\(val\) \[4/4\].*mIoU: [\d.]+', trained['out'])
    ckpt = _ckpt(osp.join(work_dir, 'iter_4.pth'))
    assert ckpt['meta']['iter'] == 4
    assert ckpt['state_dict']['backbone.patch_embed.projection.weight'] \
        .shape[0] == 16

    # Multi-scale + flip TTA from the mmseg bases, predictions written.
    pred_dir = str(trained['tmp'] / 'pred')
    out = tool_in_process(
        'test.py',
        trained['cfg'],
        osp.join(work_dir, 'iter_4.pth'),
        '--tta',
        '--out',
        pred_dir,
        '--show-dir',
        'show',  # relative: inside the run's log folder, as mmdet's
        work_dir=str(trained['tmp'] / 'test'),
        cwd=str(trained['tmp']))
    assert re.search(r'Iter\(test\) \[4/4\].*mIoU: [\d.]+', out)
    # The test run's model is the TTA wrapper around the segmentor (the
    # config dump of any run names SegTTAModel in its tta_model).
    assert re.search(
        r"^model = dict\(\n(\s+_scope_='mmseg',\n)?\s+module="
        r'dict\(', out, re.M), out[:3000]
    preds = sorted(glob.glob(osp.join(pred_dir, '*.png')))
    gts = sorted(
        glob.glob(osp.join(ade_root, 'annotations', 'validation', '*.png')))
    assert [osp.basename(p) for p in preds] == [osp.basename(g) for g in gts]
    for pred_path, gt_path in zip(preds, gts):
        pred = cv2.imread(pred_path, cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(gt_path, cv2.IMREAD_UNCHANGED)
        assert pred.shape == gt.shape  # merged back to the original size
        assert 1 <= pred.min() and pred.max() <= 150  # ADE ids
    assert not osp.exists(trained['tmp'] / 'show')
    drawn = glob.glob(str(trained['tmp'] / 'test' / '*' / 'show' / '*'))
    assert sorted(osp.basename(p) for p in drawn) == sorted(
        osp.basename(p)
        for p in glob.glob(osp.join(ade_root, 'images', 'validation', '*')))


def test_save_best_is_checked_against_what_validation_reports(trained):
    """The metric names train.py asks of the config's IoUMetric (on a
    synthetic batch) are those the real validation of the run logged: a
    save_best among them passes, another is refused."""
    from boat_tools.cli import UsageError, load_config
    from boat_tools.hooks import check_save_best, evaluator_keys

    # The summary line of the validation (not its progress lines).
    line = re.search(r'Iter\(val\) \[4/4\]\s+(.*: .*mIoU.*)$', trained['out'],
                     re.M)[1]
    logged = re.findall(r'(\w+): [\d.]+', line)
    cfg = load_config(trained['cfg'])
    keys = evaluator_keys(cfg)
    assert keys and keys == [k for k in logged if k in keys], (keys, line)
    assert set(logged) - set(keys) <= {'data_time', 'time'}
    cfg.default_hooks.checkpoint.save_best = ['auto', keys[-1]]
    check_save_best(cfg)
    cfg.default_hooks.checkpoint.save_best = 'mIoU_'
    with pytest.raises(UsageError, match="not mIoU_, and MMEngine"):
        check_save_best(cfg)


def test_paramwise_options_go_to_the_log_file_only(trained):
    """MMEngine logs a line per parameter and option of paramwise_cfg
    (hundreds for a real model): the terminal gets one summary line, the
    log file keeps them all."""
    per_param = re.compile(r'paramwise_options -- ([\w.]+):(\S+)$', re.M)
    assert not per_param.search(trained['out'])
    summary = re.search(
        r'paramwise_cfg: (\d+) parameters have their own options: (.*); '
        r'one line per parameter and option .* is in (\S+\.log)\.$',
        trained['out'], re.M)
    assert summary, trained['out'][-3000:]
    assert osp.dirname(osp.dirname(summary[3])) == trained['work_dir']
    with open(summary[3]) as f:
        lines = per_param.findall(f.read())
    # The recipe: no weight decay on norms and position tables, each of
    # them with lr, weight_decay and decay_mult.
    state = _ckpt(osp.join(trained['work_dir'], 'iter_4.pth'))['state_dict']
    decayless = {
        k
        for k in state if 'norm' in k or 'relative_position_bias_table' in k
    }
    assert {name for name, _ in lines} == decayless
    assert int(summary[1]) == len(decayless)
    assert len(lines) == 3 * len(decayless)
    assert summary[2] == (f'lr=6e-05 ({len(decayless)}), weight_decay=0.0 '
                          f'({len(decayless)}), decay_mult=0.0 '
                          f'({len(decayless)})')


def test_show_dir_interval_draws_every_nth_sample(trained, ade_root, tmp_path):
    """--interval 3 with batches of 2: samples 0 and 3 of the 4 are drawn,
    as for mmpretrain configs (mmseg's hook counts batches: it would draw
    none of these two batches)."""
    # In this process MMEngine's visualizer named 'visualizer' may be that
    # of another scope's in-process run (the hooks take the current one).
    show_dir = str(tmp_path / 'show')
    _tool_main('test.py')([
        trained['cfg'],
        osp.join(trained['work_dir'], 'iter_4.pth'), '--show-dir', show_dir,
        '--interval', '3', '--work-dir',
        str(tmp_path / 'work'), '--cfg-options',
        'test_dataloader.batch_size=2', 'visualizer.name=seg_interval'
    ])
    images = sorted(os.listdir(osp.join(ade_root, 'images', 'validation')))
    assert sorted(os.listdir(show_dir)) == [images[0], images[3]]


def test_mmseg_apis_slide_inference_and_inferencer(trained, ade_root,
                                                   tmp_path):
    """mmseg's user APIs on the checkpoint of our run: init_model and
    inference_model with a sliding window (64 px crops, stride 48) over an
    image that is no multiple of either, and MMSegInferencer on a folder
    with out_dir, drawing with the checkpoint's classes and palette."""
    from mmengine.config import Config, ConfigDict
    from mmengine.fileio import list_dir_or_file
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    ckpt = osp.join(trained['work_dir'], 'iter_4.pth')
    cfg = Config.fromfile(trained['cfg'])
    # The images as they are: no resize before the window slides.
    cfg.test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='PackSegInputs')
    ]
    model = init_model(cfg, ckpt, device='cpu')
    meta = _ckpt(ckpt)['meta']['dataset_meta']
    assert model.dataset_meta['classes'] == meta['classes']
    img = np.random.default_rng(0).integers(0, 256, (100, 75, 3), np.uint8)
    model.test_cfg = ConfigDict(
        mode='slide', crop_size=(64, 64), stride=(48, 48))
    slide = inference_model(model, img).seg_logits.data
    assert slide.shape == (150, 100, 75) and torch.isfinite(slide).all()
    # Windows at rows 0 and 36, columns 0 and 11: the pixels above row 36
    # and left of column 11 are those of the first window alone.
    model.test_cfg = ConfigDict(mode='whole')
    first = inference_model(model, img[:64, :64]).seg_logits.data
    torch.testing.assert_close(slide[:, :36, :11], first[:, :36, :11])

    inferencer = MMSegInferencer(
        model=trained['cfg'], weights=ckpt, device='cpu')
    folder = osp.join(ade_root, 'images', 'validation')
    out = inferencer(folder, out_dir=str(tmp_path / 'out'))
    # In the order MMEngine lists the folder (os.scandir's).
    names = list(list_dir_or_file(folder, list_dir=False))
    assert sorted(os.listdir(tmp_path / 'out' / 'vis')) == sorted(names)
    assert len(os.listdir(tmp_path / 'out' / 'pred')) == len(names)
    assert inferencer.visualizer.dataset_meta == dict(
        classes=meta['classes'], palette=meta['palette'])
    # The whole-image model above (the 64 px images are not resized).
    for name, pred in zip(names, out['predictions']):
        ref = inference_model(model, cv2.imread(osp.join(folder, name)))
        np.testing.assert_array_equal(pred, ref.pred_sem_seg.data[0].numpy())


SHARE_RE = r'^\s+([\d.]+) %  (.+) \((\d+)\)$'


def _mmseg_mask(cfg: str, ckpt: str, image: str) -> np.ndarray:
    """The label map of mmseg's own API (init_model, inference_model)."""
    from mmseg.apis import inference_model, init_model
    model = init_model(cfg, ckpt, device='cpu')
    return inference_model(model, image).pred_sem_seg.data[0].numpy()


# What mmseg and mmdet warn when they name the classes of Cityscapes or
# COCO (a checkpoint without class names), and what MMEngine says on every
# inferencer of theirs: the missing "function" registry, the dropped local
# storage backend.
FALLBACK_NOTE = r'(?i)cityscapes|COCO classes'
UPSTREAM_NOISE = r'"function" registry tree|provide the `save_dir`'


@contextlib.contextmanager
def _upstream_messages() -> Iterator[List[str]]:
    """The warnings and MMEngine log messages issued in the block (the
    list is filled when it ends)."""
    from mmengine.logging import MMLogger
    messages: List[str] = []

    class Recorder(logging.Handler):

        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    recorder = Recorder()
    logger.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            yield messages
    finally:
        logger.removeHandler(recorder)
    messages += [str(w.message) for w in caught]


def test_image_demo_draws_the_predicted_mask(trained, ade_root, tmp_path,
                                             capsys):
    """tools/image_demo.py IMG CONFIG CHECKPOINT (mmseg's order): at
    opacity 1 every pixel of the drawing is the palette colour, from the
    checkpoint's meta, of the class mmseg's inference_model predicts
    there; the printed shares are those of that label map."""
    ckpt = osp.join(trained['work_dir'], 'iter_4.pth')
    image = sorted(
        glob.glob(osp.join(ade_root, 'images', 'validation', '*.jpg')))[1]
    out_file = str(tmp_path / 'pred.png')
    # In this process (its command line is test_cli_manner.py's).
    with _upstream_messages() as messages:
        _tool_main('image_demo.py')([
            image, trained['cfg'], ckpt, '--out-file', out_file, '--opacity',
            '1', '--topk', '3', '--device', 'cpu'
        ])
    out = capsys.readouterr().out
    # MMEngine's messages on every inferencer, which no user can act on.
    assert not [m for m in messages if re.search(UPSTREAM_NOISE, m)]
    mask = _mmseg_mask(trained['cfg'], ckpt, image)
    meta = _ckpt(ckpt)['meta']['dataset_meta']
    palette = np.array(meta['palette'], np.uint8)
    drawn = cv2.imread(out_file)[..., ::-1]  # RGB, as the palette
    np.testing.assert_array_equal(drawn, palette[mask])

    labels, counts = np.unique(mask, return_counts=True)
    order = np.argsort(-counts, kind='stable')[:3]
    shares = [(float(s), name, int(label))
              for s, name, label in re.findall(SHARE_RE, out, re.M)]
    assert len(shares) == min(3, len(labels)), out[-2000:]
    for (share, name, label), i in zip(shares, order):
        assert label == labels[i] and name == meta['classes'][label]
        assert share == pytest.approx(100 * counts[i] / mask.size, abs=0.05)
    assert f'{len(labels)} classes' in out


def test_image_demo_without_class_names_in_the_checkpoint(
        trained, ade_root, tmp_path):
    """A checkpoint without meta (a bare state_dict): the class names and
    palette are those of the config's dataset (ADE20K's 150), not mmseg's
    Cityscapes fallback; --with-labels writes the names, in white on boxes
    of the class colour, over the drawing of the mask."""
    state = _ckpt(osp.join(trained['work_dir'], 'iter_4.pth'))['state_dict']
    bare = str(tmp_path / 'bare.pth')
    torch.save(dict(state_dict=state), bare)
    # 320 px (the test pipeline resizes it to 64): mmseg writes the names
    # at a size that grows with the image, unreadable below 300 px.
    first = sorted(
        glob.glob(osp.join(ade_root, 'images', 'validation', '*.jpg')))[0]
    image = str(tmp_path / 'image.png')
    cv2.imwrite(image, cv2.resize(cv2.imread(first), (320, 320)))
    with _upstream_messages() as messages:
        res = _tool_main('image_demo.py')([
            image, trained['cfg'], '--checkpoint', bare, '--opacity', '1',
            '--with-labels', '--out-file',
            str(tmp_path / 'labels.png')
        ])
    # The tool's own note, then none of mmseg's on its Cityscapes fallback.
    assert any('Class names of the config' in m for m in messages)
    assert not [m for m in messages if re.search(FALLBACK_NOTE, m)]
    assert not [m for m in messages if re.search(UPSTREAM_NOISE, m)]
    from mmseg.datasets import ADE20KDataset
    names = ADE20KDataset.METAINFO['classes']
    palette = np.array(ADE20KDataset.METAINFO['palette'], np.uint8)
    assert res['mask'].max() < len(names)
    assert [name for _, name, _ in res['shares']
            ] == [names[label] for label, _, _ in res['shares']]
    # Outside the name boxes, the colours of the mask.
    changed = (res['drawing'] != palette[res['mask']]).any(-1)
    assert 0 < changed.mean() < 0.5
    assert (res['drawing'][changed] == 255).all(-1).any()  # the names


def check_resume(trained: dict, moved_key: str, *args:
                 str) -> Tuple[dict, dict, dict]:
    """Stop a copy of the ``trained`` run after its iteration-2 checkpoint,
    resume it with ``train.py --resume *args`` and check that it ends
    where the uninterrupted run ended, having trained ``moved_key``.

    Returns:
        tuple: The iteration-4 checkpoints of the uninterrupted and of the
        resumed run, and the iteration-2 one.
    """
    full = trained['work_dir']
    work_dir = str(trained['tmp'] / 'interrupted')
    os.makedirs(work_dir)
    # What a run killed during iteration 3 leaves behind.
    shutil.copy(osp.join(full, 'iter_2.pth'), work_dir)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(work_dir, 'iter_2.pth'))

    out = tool_in_process(
        'train.py',
        trained['cfg'],
        '--resume',
        *args,
        work_dir=work_dir,
        cwd=str(trained['tmp']))
    assert 'resumed epoch: 0, iter: 2' in out
    # The same config: nothing restored differs from it (paramwise_cfg
    # gives the optimizer many groups, each compared).
    assert ' - WARNING - --resume ' not in out, out[-3000:]
    assert 'Iter(train) [1/4]' not in out and 'Iter(train) [3/4]' in out

    ref = _ckpt(osp.join(full, 'iter_4.pth'))
    got = _ckpt(osp.join(work_dir, 'iter_4.pth'))
    assert got['param_schedulers'] == ref['param_schedulers']
    for key, value in ref['state_dict'].items():
        torch.testing.assert_close(
            got['state_dict'][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # ... and it did train: the weights moved since iteration 2.
    start = _ckpt(osp.join(full, 'iter_2.pth'))
    assert not torch.equal(start['state_dict'][moved_key],
                           got['state_dict'][moved_key])
    return ref, got, start


def test_resume_continues_interrupted_run(trained):
    """A run stopped after its iteration-2 checkpoint and resumed with
    ``--resume`` ends exactly where the uninterrupted run ended."""
    ref, got, start = check_resume(trained, 'decode_head.conv_seg.weight')
    assert got['meta']['iter'] == ref['meta']['iter'] == 4
    lrs = [g['lr'] for g in got['optimizer']['param_groups']]
    assert lrs == [g['lr'] for g in ref['optimizer']['param_groups']]
    # The LR kept decaying along the poly schedule after the resume.
    assert 0 < lrs[0] < start['optimizer']['param_groups'][0]['lr']


def test_resume_refuses_an_optimizer_of_other_groups(trained, capsys):
    """--resume after frozen_stages changed: the run's optimizer has fewer
    parameter groups (the frozen weights leave paramwise_cfg's groups) than
    the checkpoint's state, which torch would refuse with a traceback
    after the runner set up; the refusal names both counts and the fix.
    MMEngine's warning per frozen parameter goes to the log file only, with
    one summary line on the terminal."""
    from boat_tools.cli import UsageError
    ckpt = osp.join(trained['work_dir'], 'iter_2.pth')
    groups = _ckpt(ckpt)['optimizer']['param_groups']
    work_dir = str(trained['tmp'] / 'frozen')
    with pytest.raises(UsageError) as exc:
        tool_in_process(
            'train.py',
            trained['cfg'],
            '--resume',
            ckpt,
            '--cfg-options',
            'model.backbone.frozen_stages=1',
            work_dir=work_dir,
            cwd=str(trained['tmp']))
    log, = glob.glob(osp.join(work_dir, '*', '*.log'))
    with open(log) as f:
        skipped = re.findall(
            r'WARNING - (backbone\.\S+) is skipped since its '
            r'requires_grad=False$', f.read(), re.M)
    # frozen_stages=1, mmseg's meaning: the stem, stage 0 and its out norm.
    assert skipped and all(
        name.startswith(('backbone.patch_embed.', 'backbone.stages.0.',
                         'backbone.norm0.')) for name in skipped), skipped
    terminal = capsys.readouterr().out
    assert 'WARNING - backbone.' not in terminal
    assert (f'{len(skipped)} frozen parameters (requires_grad=False) are '
            f'left out of the optimizer; one line each') in terminal
    ours = re.search(
        rf"^--resume '.*iter_2.pth': its optimizer state has {len(groups)} "
        rf'parameter groups \({sum(len(g["params"]) for g in groups)} '
        r"parameters\), this run's optimizer (\d+) \((\d+)\): the trainable "
        r'parameters or their grouping changed \(frozen_stages, '
        r'paramwise_cfg, the architecture\)\. Resume with the config the '
        r'checkpoint was trained with, or start a new run from its weights '
        r'with `--cfg-options load_from=FILE` \(without --resume\)$',
        str(exc.value))
    assert ours, exc.value
    assert 0 < int(ours[1]) < len(groups)


def test_resume_says_what_it_restores(trained):
    """Resuming the finished run with another learning rate and another
    end of the poly phase: MMEngine restores the checkpoint's rate and
    schedule and trains nothing; train.py warns of each, with the values
    of the config and of the checkpoint."""
    ckpt = osp.join(trained['work_dir'], 'iter_4.pth')
    saved = _ckpt(ckpt)
    first_lr = saved['optimizer']['param_groups'][0]['initial_lr']
    poly_end = saved['param_schedulers'][1]['end']
    log = tool_in_process(
        'train.py',
        trained['cfg'],
        '--resume',
        ckpt,
        '--cfg-options',
        f'optim_wrapper.optimizer.lr={3 * first_lr}',
        f'param_scheduler.1.end={poly_end + 4}',
        work_dir=str(trained['tmp'] / 'restores'),
        cwd=str(trained['tmp']))
    warnings = [
        ln for ln in log.splitlines() if ' - WARNING - --resume ' in ln
    ]
    assert len(warnings) == 3, log[-3000:]
    assert warnings[0].endswith(
        'the checkpoint is at iteration 4 and the run ends at 4: nothing is '
        'left to train (raise train_cfg.max_iters to train on)')
    assert (f'this run starts parameter group 0 at a learning rate of '
            f'{3 * first_lr:g} (the config\'s, scaled by --auto-scale-lr if '
            f'given), the checkpoint\'s run at {first_lr:g}: MMEngine '
            f'restores the checkpoint\'s learning rates') in warnings[1]
    assert (f'param_scheduler[1] (PolyLR) ends at iteration {poly_end + 4} '
            f'in this run and at iteration {poly_end} in the checkpoint: '
            f"MMEngine restores the checkpoint's schedulers") in warnings[2]
    assert 'Iter(train)' not in log


def test_checkpoint_of_another_config_is_refused(trained, capsys):
    """test.py, train.py --resume and image_demo.py of a checkpoint whose
    backbone fits but whose heads are of another config (another number of
    classes, no auxiliary head): one line naming the fix, before any test,
    training step or prediction, where MMEngine and the upstream
    inferencers would run random heads."""
    ckpt = _ckpt(osp.join(trained['work_dir'], 'iter_2.pth'))
    weights = ckpt['state_dict']
    for key in [k for k in weights if k.startswith('auxiliary_head.')]:
        del weights[key]
    weights['decode_head.conv_seg.weight'] = \
        weights['decode_head.conv_seg.weight'][:3]
    other = str(trained['tmp'] / 'other_config.pth')
    torch.save(ckpt, other)
    aux = sum(1 for k in weights if k.startswith('auxiliary_head.'))
    assert aux == 0
    image = str(trained['tmp'] / 'image.png')
    cv2.imwrite(image, np.zeros((32, 32, 3), np.uint8))
    for tool, args in [('test.py', [trained['cfg'], other]),
                       ('train.py', [trained['cfg'], '--resume', other]),
                       ('image_demo.py', [
                           image, trained['cfg'], '--checkpoint', other,
                           '--out-file',
                           str(trained['tmp'] / 'refused.png')
                       ])]:
        refused = str(trained['tmp'] / 'refused')
        if tool != 'image_demo.py':
            args += [
                '--work-dir', refused, '--cfg-options',
                f'visualizer.name={refused}/{tool}'
            ]
        with pytest.raises(SystemExit) as exc:
            load_script(f'tools/{tool}').main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1, err
        assert re.search(
            r"error: (checkpoint|--resume|--checkpoint) '.*other_config.pth' "
            r"leaves \d+ "
            r"of the model's \d+ weights at their initial values \(missing: "
            r"\['auxiliary_head\..*other shapes: decode_head.conv_seg.weight "
            r'\(checkpoint \[3, 16, 1, 1\], model \[150, 16, 1, 1\]\)\): it '
            r'is a checkpoint of another model or config', err), err
        assert not glob.glob(osp.join(refused, '*', 'vis_data', '*.json'))


def check_amp_run(trained: dict, loss: str, val: str) -> dict:
    """``tools/train.py --amp`` for 2 iterations of the ``trained`` run's
    config (on the GPU): finite ``loss`` values at both iterations, the
    validation line matching ``val``, and MMEngine's float16 wrapper with
    its loss scaler in the checkpoint, which it returns."""
    work_dir = str(trained['tmp'] / 'amp')
    out = _tool(
        'train.py',
        trained['cfg'],
        '--amp',
        '--work-dir',
        work_dir,
        '--cfg-options',
        'train_cfg.max_iters=2',
        'train_cfg.val_interval=2',
        cwd=str(trained['tmp']))
    # A nan or inf loss does not match the number pattern.
    losses = re.findall(rf'Iter\(train\) \[\d/2\].*?{loss}: ([\d.]+)', out)
    assert len(losses) == 2, out[-3000:]
    assert re.search(val, out), out[-3000:]
    ckpt = _ckpt(osp.join(work_dir, 'iter_2.pth'))
    assert 'loss_scaler' in ckpt['optimizer']
    return ckpt


@pytest.mark.cuda
def test_amp_training_on_gpu(trained):
    """Mixed precision, as GPU users train: FSLA's Triton kernels and the
    heads in float16 under MMEngine's AmpOptimWrapper."""
    check_amp_run(trained, r'decode\.loss_ce', r'Iter\(val\) \[4/4\].*mIoU')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason='two processes on CUDA take a GPU each (NCCL)')
def test_ddp_two_processes_train_and_evaluate(trained):
    work_dir = str(trained['tmp'] / 'ddp')
    out = _run([
        'bash',
        osp.join(REPO, 'tools',
                 'dist_train.sh'), trained['cfg'], '2', '--work-dir', work_dir,
        '--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2'
    ],
               cwd=str(trained['tmp']),
               env=dict(PYTHON=sys.executable, PORT=str(_free_port())))
    assert re.search(r'Distributed training: True', out)
    assert re.search(r'GPU number: 2', out)
    assert re.search(r'Iter\(val\) \[2/2\].*mIoU: [\d.]+', out)  # 4 / 2
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))


def test_upstream_mmseg_train_tool_runs_our_config(trained):
    """mmseg's own tools/train.py (shipped in the wheel) needs nothing but
    the config's ``custom_imports``."""
    import mmseg
    tool = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools', 'train.py')
    assert osp.isfile(tool)
    work_dir = str(trained['tmp'] / 'upstream')
    _run([
        sys.executable, tool, trained['cfg'], '--work-dir', work_dir,
        '--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2'
    ],
         cwd=str(trained['tmp']))
    ckpt = _ckpt(osp.join(work_dir, 'iter_2.pth'))
    assert ckpt['meta']['iter'] == 2


def test_user_config_swaps_arch_of_boat_swin(tmp_path, ade_root):
    """A config outside the repo inherits a BOAT-Swin config by path, swaps
    the arch for a custom one, builds and trains."""
    cfg = _user_cfg(
        str(tmp_path / 'my_boat_swin.py'), SWIN_T, ade_root, SWIN_ARCH)
    work_dir = str(tmp_path / 'work')
    out = tool_in_process(
        'train.py',
        cfg,
        '--no-validate',
        '--cfg-options',
        'train_cfg.max_iters=2',
        work_dir=work_dir,
        cwd=str(tmp_path))
    assert re.search(r'Iter\(train\) \[2/2\]', out)
    state = _ckpt(osp.join(work_dir, 'iter_2.pth'))['state_dict']
    assert state['backbone.norm3.weight'].shape == (96, )
    assert any('fsla' in k for k in state)


def tool_in_process(name: str, *args: str, work_dir: str, cwd: str) -> str:
    """``tools/NAME *args --work-dir WORK_DIR`` run by its ``main`` in this
    process, from ``cwd`` (no second import of torch and the OpenMMLab
    packages; the command lines in a fresh process are what the other
    runs here check); returns the run's log file, which holds what the
    run logs to the terminal.

    Its visualizer is its own, named after the work dir (MMEngine
    returns the one of a name made before, and the configs name theirs
    'visualizer'); so is its experiment (MMEngine names it after the
    config file and the second the run starts, and a second run of a
    config within that second got the first's logger, which writes no
    log file into the new work dir); ``--cfg-options``, if any, come last
    in ``args``.
    """
    if '--cfg-options' not in args:
        args += ('--cfg-options', )
    old = os.getcwd()
    os.chdir(cwd)
    try:
        _tool_main(name)([
            *args[:args.index('--cfg-options')], '--work-dir', work_dir,
            *args[args.index('--cfg-options'):], f'visualizer.name={work_dir}',
            f'experiment_name={work_dir}'
        ])
    finally:
        os.chdir(old)
    log, = glob.glob(osp.join(work_dir, '*', '*.log'))
    with open(log) as f:
        return f.read()


def _tool_main(name: str):
    """The ``main`` of a tool script, loaded without running it."""
    # Undecorated: the errors themselves (their one-line report is tested
    # in test_cli_manner.py).
    main = runpy.run_path(
        osp.join(REPO, 'tools', name), run_name='boat_tool')['main']
    return main.__wrapped__


def test_missing_data_root_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ade here
    with pytest.raises(FileNotFoundError) as err:
        _tool_main('train.py')([HEADLINE, '--work-dir', str(tmp_path / 'w')])
    msg = str(err.value)
    assert "'data/ade/ADEChallengeData2016' does not exist" in msg
    assert 'ADEChallengeData2016.zip' in msg and 'make demo' in msg

    # An existing but empty image folder is caught too, also by test.py.
    os.makedirs(tmp_path / 'empty' / 'images' / 'validation')
    ckpt = tmp_path / 'model.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='is an empty folder'):
        _tool_main('test.py')([
            HEADLINE,
            str(ckpt), '--cfg-options',
            f'test_dataloader.dataset.data_root={tmp_path / "empty"}'
        ])
    with pytest.raises(FileNotFoundError, match='checkpoint'):
        _tool_main('test.py')([HEADLINE, str(tmp_path / 'missing.pth')])


def test_demo_montage_and_chance_level(tmp_path):
    """The demo's picture and chance level, on a hand-made prediction."""
    demo = runpy.run_path(
        osp.join(REPO, 'tools', 'run_demo.py'), run_name='boat_demo')
    root = tmp_path / 'ADEChallengeData2016'
    for sub in ('images/validation', 'annotations/validation'):
        os.makedirs(root / sub)
    os.makedirs(tmp_path / 'pred')
    gt = np.zeros((8, 8), np.uint8)
    gt[:, :6], gt[:, 6:] = 1, 2  # 48 pixels of class 1, 16 of class 2
    cv2.imwrite(
        str(root / 'images/validation/a.jpg'), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(root / 'annotations/validation/a.png'), gt)
    cv2.imwrite(str(tmp_path / 'pred' / 'a.png'), gt)
    # Uniform guesses among 2 classes: IoU_k = (n_k / 2) / (n_k + 32 -
    # n_k / 2): 24 / 56 for class 1, 8 / 40 for class 2.
    expected = (24 / 56 + 8 / 40) / 2 * 100
    assert demo['chance_miou'](str(root / 'annotations/validation')) == \
        pytest.approx(expected)
    out = str(tmp_path / 'vis' / 'predictions.png')
    demo['draw_montage'](str(root), str(tmp_path / 'pred'), out, 6)
    picture = cv2.imread(out)
    assert picture.shape[1] == 3 * 196
    # Ground truth and prediction tiles are painted alike.
    row = picture[28 + 96]
    np.testing.assert_array_equal(row[196:196 + 192], row[392:392 + 192])


def test_publish_model_of_a_segmentor(trained, tmp_path, capsys):
    """publish_model.py on a segmentation checkpoint (no EMA): the same
    weights, the run's dataset_meta (the class names and palette mmseg's
    init_model, hence tools/image_demo.py, take from the checkpoint), no
    training state."""
    tool = runpy.run_path(
        osp.join(REPO, 'tools', 'model_converters', 'publish_model.py'),
        run_name='boat_tool')
    src = osp.join(trained['work_dir'], 'iter_4.pth')
    assert tool['main']([src, str(tmp_path / 'seg.pth')]) == 0
    assert 'trained weights; dropped' in capsys.readouterr().out
    path, = glob.glob(str(tmp_path / 'seg-*.pth'))
    pub, ref = _ckpt(path), _ckpt(src)
    assert set(pub) == {'state_dict', 'meta'} and pub['meta']['ema'] is False
    assert list(pub['state_dict']) == list(ref['state_dict'])
    for k, v in ref['state_dict'].items():
        assert torch.equal(pub['state_dict'][k], v), k
    assert pub['meta']['dataset_meta'] == ref['meta']['dataset_meta']

    from mmseg.apis import init_model
    model = init_model(trained['cfg'], path, device='cpu')
    meta = ref['meta']['dataset_meta']
    assert model.dataset_meta['classes'] == tuple(meta['classes'])
    assert np.array_equal(model.dataset_meta['palette'], meta['palette'])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref['state_dict'][k]), k
