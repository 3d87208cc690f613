# Copyright (c) boat-mm contributors. All rights reserved.
"""The two-command demo (``make demo``): BOAT-CSWin + UPerNet, end to end.

1. Generate the synthetic ADE20K-like dataset (skipped when present).
2. Train ``configs/demo/boat-cswin-tiny_upernet_demo.py`` with
   ``tools/train.py`` (MMEngine's progress and ETA logs appear as it goes).
3. Test the checkpoint with ``tools/test.py`` and print the mIoU next to the
   chance level of the validation set.
4. Draw image | ground truth | prediction for a few validation images into
   ``WORK_DIR/vis/predictions.png``.

Run from the repository root::

    python tools/run_demo.py [--work-dir work_dirs/demo] [--max-iters N]

Exit status 1 when the mIoU is not clearly above chance.
"""
import argparse
import glob
import os
import os.path as osp
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

import cv2
import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
from boat_tools.cli import ArgumentParser, check_file, tool_main

CONFIG = osp.join('configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
DATA_DIR = osp.join('data', 'ade_synthetic')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=CONFIG, help='demo config')
    parser.add_argument(
        '--work-dir',
        default=osp.join('work_dirs', 'demo'),
        help='logs, checkpoint, predictions and pictures go here')
    parser.add_argument(
        '--data-dir',
        default=DATA_DIR,
        help='where the generated dataset lives (ADEChallengeData2016/ '
        'inside); generated when missing')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument(
        '--max-iters',
        type=int,
        default=None,
        help='override the training length of the config')
    parser.add_argument(
        '--num-vis', type=int, default=6, help='images in the picture')
    parser.add_argument(
        '--min-gain',
        type=float,
        default=2.0,
        help='fail unless mIoU >= this many times the chance level')
    return parser.parse_args(argv)


def _run(cmd: List[str], log_file: Optional[str] = None) -> str:
    """Run a command, streaming its output; return the output."""
    print('$ ' + ' '.join(cmd), flush=True)
    # Library deprecation warnings would drown the progress lines.
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    proc.wait()
    out = ''.join(lines)
    if log_file:
        with open(log_file, 'w') as f:
            f.write(out)
    if proc.returncode != 0:
        raise SystemExit(f'Command failed with exit status '
                         f'{proc.returncode}: {" ".join(cmd)}')
    return out


def ensure_dataset(data_dir: str, num_train: int, num_val: int) -> str:
    """Generate the ADE20K-like dataset unless it is already there."""
    root = osp.join(data_dir, 'ADEChallengeData2016')
    train_dir = osp.join(root, 'images', 'training')
    if osp.isdir(train_dir) and os.listdir(train_dir):
        print(f'Using the generated dataset in {root}', flush=True)
        return root
    from boat_mm.datasets import generate_ade20k_like
    print(f'Generating the ADE20K-like dataset in {root} ...', flush=True)
    return generate_ade20k_like(
        osp.join(REPO, data_dir) if not osp.isabs(data_dir) else data_dir,
        num_train=num_train,
        num_val=num_val,
        img_size=128,
        seed=0)


def chance_miou(ann_dir: str) -> float:
    """Expected mIoU (%) of predicting uniformly at random among the classes
    present in the annotations (label 0 = ignored)."""
    counts = np.zeros(256, np.int64)
    for path in glob.glob(osp.join(ann_dir, '*.png')):
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        counts += np.bincount(label.ravel(), minlength=256)
    counts = counts[1:]
    counts = counts[counts > 0].astype(np.float64)
    n, c = counts.sum(), len(counts)
    # Intersection n_k / c; union n_k + n / c - n_k / c.
    iou = (counts / c) / (counts + n / c - counts / c)
    return float(iou.mean() * 100)


def _colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """ADE ids (0 = other, black) to a BGR picture."""
    lut = np.zeros((256, 3), np.uint8)
    lut[1:1 + len(palette)] = palette[:, ::-1]  # RGB palette -> BGR
    return lut[label]


def draw_montage(root: str, pred_dir: str, out_file: str, num: int) -> None:
    """Rows of image | ground truth | prediction, with a legend."""
    from mmseg.datasets import ADE20KDataset
    palette = np.array(ADE20KDataset.METAINFO['palette'], np.uint8)
    classes = ADE20KDataset.METAINFO['classes']
    preds = sorted(glob.glob(osp.join(pred_dir, '*.png')))[:num]
    if not preds:
        raise SystemExit(f'No predictions in {pred_dir}.')
    rows, present = [], set()
    for pred_path in preds:
        name = osp.splitext(osp.basename(pred_path))[0]
        img = cv2.imread(osp.join(root, 'images', 'validation', name + '.jpg'))
        gt = cv2.imread(
            osp.join(root, 'annotations', 'validation', name + '.png'),
            cv2.IMREAD_UNCHANGED)
        pred = cv2.imread(pred_path, cv2.IMREAD_UNCHANGED)
        present.update(np.unique(gt).tolist())
        present.update(np.unique(pred).tolist())
        tiles = [img, _colorize(gt, palette), _colorize(pred, palette)]
        size = 192
        tiles = [
            cv2.resize(t, (size, size), interpolation=cv2.INTER_NEAREST)
            for t in tiles
        ]
        rows.append(
            np.concatenate([
                np.concatenate([t, np.full((size, 4, 3), 255, np.uint8)], 1)
                for t in tiles
            ], 1))
    grid = np.concatenate(rows, 0)
    header = np.full((28, grid.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(['image', 'ground truth', 'prediction']):
        cv2.putText(header, text, (i * 196 + 8, 20), cv2.FONT_HERSHEY_SIMPLEX,
                    0.55, (0, 0, 0), 1)
    # Legend of every class shown, three per line.
    legend_ids = sorted(k for k in present if k > 0)
    lines = (len(legend_ids) + 2) // 3
    legend = np.full((22 * lines + 8, grid.shape[1], 3), 255, np.uint8)
    for j, k in enumerate(legend_ids):
        x, y = 8 + 196 * (j % 3), 8 + 22 * (j // 3)
        legend[y:y + 16, x:x + 16] = palette[k - 1][::-1]
        cv2.putText(legend, f'{k}: {classes[k - 1]}'[:24], (x + 22, y + 13),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1)
    os.makedirs(osp.dirname(out_file), exist_ok=True)
    cv2.imwrite(out_file, np.concatenate([header, grid, legend], 0))


def _last_checkpoint(work_dir: str) -> str:
    marker = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(marker):
        with open(marker) as f:
            path = f.read().strip()
        if osp.isfile(path):
            return path
    ckpts = sorted(
        glob.glob(osp.join(work_dir, 'iter_*.pth')),
        key=lambda p: int(re.findall(r'iter_(\d+)', p)[0]))
    if not ckpts:
        raise SystemExit(f'No checkpoint in {work_dir}.')
    return ckpts[-1]


def _parse_metrics(output: str) -> Dict[str, float]:
    found = re.findall(r'Iter\(test\).*?aAcc: ([\d.]+)\s+mIoU: ([\d.]+)',
                       output)
    if not found:
        raise SystemExit('Could not find the test metrics in the output.')
    acc, miou = found[-1]
    return dict(aAcc=float(acc), mIoU=float(miou))


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    check_file(args.config, 'config file',
               f'pass a segmentation config (default {CONFIG})')
    py = sys.executable
    work_dir = args.work_dir
    os.makedirs(work_dir, exist_ok=True)
    times = {}

    start = time.time()
    root = ensure_dataset(args.data_dir, args.num_train, args.num_val)
    times['data'] = time.time() - start

    start = time.time()
    cmd = [py, 'tools/train.py', args.config, '--work-dir', work_dir]
    options = [
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}'
    ]
    if args.max_iters:
        n, warmup = args.max_iters, max(1, args.max_iters // 10)
        options += [
            f'train_cfg.max_iters={n}', f'train_cfg.val_interval={n}',
            f'default_hooks.checkpoint.interval={n}',
            f'param_scheduler.0.end={warmup}',
            f'param_scheduler.1.begin={warmup}', f'param_scheduler.1.end={n}'
        ]
    _run(cmd + ['--cfg-options'] + options,
         osp.join(work_dir, 'train_output.log'))
    times['train'] = time.time() - start

    start = time.time()
    ckpt = _last_checkpoint(work_dir)
    pred_dir = osp.join(work_dir, 'pred')
    out = _run([
        py, 'tools/test.py', args.config, ckpt, '--work-dir',
        osp.join(work_dir, 'test'), '--out', pred_dir, '--cfg-options'
    ] + options[2:], osp.join(work_dir, 'test_output.log'))
    metrics = _parse_metrics(out)
    times['test'] = time.time() - start

    start = time.time()
    picture = osp.join(work_dir, 'vis', 'predictions.png')
    draw_montage(root, pred_dir, picture, args.num_vis)
    times['picture'] = time.time() - start

    chance = chance_miou(osp.join(root, 'annotations', 'validation'))
    total = sum(times.values())
    print('\n' + '=' * 72)
    print('BOAT-CSWin + UPerNet demo on the synthetic ADE20K-like data')
    print(f'  mIoU {metrics["mIoU"]:.2f}  (pixel accuracy '
          f'{metrics["aAcc"]:.2f}; chance level {chance:.2f}: uniform '
          f'guesses among the classes present)')
    print(f'  checkpoint  {ckpt}')
    print(f'  picture     {picture}  (image | ground truth | prediction)')
    print(f'  predictions {pred_dir}/*.png  (ADE ids)')
    print('  time: ' + ', '.join(f'{k} {v:.0f}s' for k, v in times.items()) +
          f'; total {total / 60:.1f} min')
    print('=' * 72)
    if metrics['mIoU'] < args.min_gain * chance:
        print(
            f'mIoU is not clearly above chance (< {args.min_gain} x '
            f'{chance:.2f}).',
            file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
