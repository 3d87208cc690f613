# Copyright (c) boat-mm contributors. All rights reserved.
"""How the CPU's kernel choice moves the demo's training (not a speed test).

The same demo model, weights and batches are run under several settings
that change only which CPU kernels torch uses (ATen's vector ISA, oneDNN's
and MKL's ISA, the thread count), each in a fresh process because the
libraries read these settings once. For each setting it prints, against
the machine's default:

* the largest relative difference of the untrained model's logits on one
  batch (float rounding alone: same weights, same input, eval mode);
* the share of tokens whose FSLA cluster differs in the first FSLA block
  (32x32 map, 16 clusters) on that input, per head, before training;
* the first training step whose loss is not bitwise equal, and the losses
  after ``--steps`` steps of the demo recipe (same batches, same order);
* the share of tokens in a different cluster after training.

A second run of the default setting shows that the run itself is
deterministic, so every difference comes from the kernels. Run from the
repository root (needs the generated demo data, ``make demo`` or
``gen_synthetic_data.py ade20k``)::

    python benchmarks/cpu_divergence.py [--steps 20] [--batch 4]
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'demo', 'boat-cswin-tiny_upernet_demo.py')
DATA = osp.join(REPO, 'data', 'ade_synthetic', 'ADEChallengeData2016')

# name -> environment changes (None: the machine's default).
SETTINGS = {
    'default': {},
    'default, again': {},
    'ATEN_CPU_CAPABILITY=avx2': {
        'ATEN_CPU_CAPABILITY': 'avx2'
    },
    'ATEN_CPU_CAPABILITY=default': {
        'ATEN_CPU_CAPABILITY': 'default'
    },
    'ONEDNN_MAX_CPU_ISA=AVX2': {
        'ONEDNN_MAX_CPU_ISA': 'AVX2'
    },
    'MKL_ENABLE_INSTRUCTIONS=AVX2': {
        'MKL_ENABLE_INSTRUCTIONS': 'AVX2'
    },
    '2 threads': {
        'OMP_NUM_THREADS': '2'
    },
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--data-dir', default=DATA)
    parser.add_argument(
        '--settings',
        nargs='+',
        default=list(SETTINGS),
        help=f'which of {list(SETTINGS)}')
    parser.add_argument(
        '--child', nargs=2, metavar=('INIT', 'OUT'), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _build():
    """The demo segmentor, its optimiser and the first FSLA module."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(CONFIG)
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    fsla = next(m for m in model.modules()
                if type(m).__name__ == 'FeatureSpaceLocalAttention')
    return model, cfg, fsla, lambda: build_optim_wrapper(
        model, cfg.optim_wrapper)


def _batches(data_dir: str, batch: int, steps: int):
    """Fixed batches of the generated training set, no augmentation."""
    import cv2
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    images = sorted(
        glob.glob(osp.join(data_dir, 'images', 'training', '*.jpg')))
    if len(images) < batch:
        raise SystemExit(f'no generated data in {data_dir}: run `python '
                         f'tools/dataset_converters/gen_synthetic_data.py '
                         f'ade20k data/ade_synthetic` first.')
    out = []
    for step in range(steps + 1):
        inputs, samples = [], []
        for i in range(batch):
            path = images[(step * batch + i) % len(images)]
            # (From the file name: str.replace would also rewrite a folder
            # named like 'images' above data_dir.)
            name = osp.splitext(osp.basename(path))[0]
            ann = osp.join(data_dir, 'annotations', 'training', name + '.png')
            img = cv2.imread(path)[:128, :128]
            label = cv2.imread(ann, cv2.IMREAD_UNCHANGED)[:128, :128]
            # reduce_zero_label, as the demo pipeline.
            label = label.astype('int64') - 1
            label[label < 0] = 255
            inputs.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
            sample = SegDataSample()
            sample.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None])
            samples.append(sample)
        out.append(dict(inputs=inputs, data_samples=samples))
    return out


def child(init: str, out: str, args: argparse.Namespace) -> None:
    """One setting: forward, clusters and a short training run."""
    import torch
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    model, cfg, fsla, make_optim = _build()
    model.load_state_dict(torch.load(init, weights_only=True))
    batches = _batches(args.data_dir, args.batch, args.steps)
    seen = {}

    def hook(module, inputs):
        seen['x'], seen['hw'] = inputs[0].detach(), tuple(inputs[1])

    fsla.register_forward_pre_hook(hook)

    def probe():
        model.eval()
        with torch.no_grad():
            data = model.data_preprocessor(batches[-1], False)
            logits = model(data['inputs'], mode='tensor')
            ids = fsla.cluster_ids(seen['x'], seen['hw'])
        model.train()
        return logits.double(), ids

    logits0, ids0 = probe()
    optim = make_optim()
    torch.manual_seed(0)  # drop path draws
    losses = []
    for data in batches[:args.steps]:
        log = model.train_step(data, optim)
        losses.append(float(log['loss']))
    _, ids1 = probe()
    torch.save(
        dict(
            logits0=logits0,
            ids0=ids0,
            ids1=ids1,
            losses=losses,
            capability=torch.backends.cpu.get_cpu_capability()), out)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(*args.child, args)
        return 0
    import torch
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        raise SystemExit(f'unknown settings {sorted(unknown)}; choose from '
                         f'{list(SETTINGS)}')
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model, *_ = _build()
        # init_weights logs every parameter through mmengine's logger.
        from mmengine.logging import MMLogger
        MMLogger.get_current_instance().setLevel('WARNING')
        model.init_weights()
        init = osp.join(tmp, 'init.pth')
        torch.save(model.state_dict(), init)
        for name in args.settings:
            out = osp.join(tmp, 'out.pth')
            env = dict(
                os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
            env.update(SETTINGS[name])
            cmd = [
                sys.executable, __file__, '--child', init, out, '--steps',
                str(args.steps), '--batch',
                str(args.batch), '--data-dir', args.data_dir
            ]
            subprocess.run(
                cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            results[name] = torch.load(out, weights_only=False)
    base = results[args.settings[0]]
    print(f'torch {torch.__version__}, {args.steps} steps of batch '
          f'{args.batch}, against "{args.settings[0]}" '
          f'(ATen ISA {base["capability"]})')
    header = ('setting', 'ATen ISA', 'logits rel. diff', 'clusters moved',
              'first loss diff', f'loss @{args.steps}', 'clusters moved after')
    print(' | '.join(header))
    for name, r in results.items():
        rel = ((r['logits0'] - base['logits0']).abs().max() /
               base['logits0'].abs().max()).item()
        moved0 = (r['ids0'] != base['ids0']).double().mean().item()
        moved1 = (r['ids1'] != base['ids1']).double().mean().item()
        first = next(
            (i for i, (a, b) in enumerate(zip(r['losses'], base['losses']))
             if a != b), None)
        print(' | '.join([
            name, r['capability'], f'{rel:.1e}', f'{100 * moved0:.2f} %',
            '-' if first is None else str(first), f'{r["losses"][-1]:.4f}',
            f'{100 * moved1:.2f} %'
        ]))
    print(json.dumps({k: v['losses'] for k, v in results.items()}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
