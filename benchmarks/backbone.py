# Copyright (c) boat-mm contributors. All rights reserved.
"""Training-step speed and memory of the BOAT backbones.

Compares, side by side in one process, a training step (forward and
backward of the backbone, no optimiser) of:

- ``boat-{family}-t``: the tiny model of each registered BOAT family
  (:func:`boat_mm.models.boat_families`: ``boat-cswin-t``,
  ``boat-swin-t``), FSLA on;
- ``{family}-t``: the same backbone with ``with_fsla=False``
  (``cswin-t``, ``swin-t``);
- ``mmpretrain-swin-t``: mmpretrain's ``SwinTransformer`` tiny.

It reports images per second (median step time after warm-up; CUDA: CUDA
events), the peak memory of a step (CUDA: ``max_memory_allocated``
above what was allocated before it) and the ratios that issue #11 sets a
target for, once per ``--dtypes`` entry (``bf16``: bfloat16 autocast).

Example::

    python benchmarks/backbone.py --device cuda      # 512x512, batch 8
    python benchmarks/backbone.py --quick            # CPU smoke test
"""
import argparse
import statistics
import sys
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from _timing import (PeakMemory, add_device_args, amp_context, device_name,
                     parse_dtypes, timed)

from boat_mm.models import boat_families

# name -> (family, with_fsla), for each registered family.
BOAT_MODELS = {
    f'{prefix}{family.family}-t': (family, prefix == 'boat-')
    for family in boat_families()
    for prefix in ('boat-', '')
}
MODELS = (*BOAT_MODELS, 'mmpretrain-swin-t')
# Step-time ratios that issue #11 sets a target for (on CUDA).
TARGETS = {('boat-cswin-t', 'cswin-t'): 1.35}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument(
        '--size',
        type=int,
        default=None,
        help='image side; default 512 (--quick: 64)')
    parser.add_argument(
        '--batch', type=int, default=None, help='default 8 (--quick: 1)')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='a 64x64 image, batch 1, 1 repeat (smoke test)')
    parser.add_argument(
        '--repeats',
        type=int,
        default=None,
        help='timed steps per model; default 10 (--quick: 1)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--models',
        default=','.join(MODELS),
        help='comma-separated subset of ' + ','.join(MODELS))
    args = parser.parse_args()
    if args.size is None:
        args.size = 64 if args.quick else 512
    if args.batch is None:
        args.batch = 1 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1 if args.quick else 10
    if args.quick:
        args.warmup = 1
    parse_dtypes(args)
    args.models = [m.strip() for m in args.models.split(',') if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise SystemExit(f'unknown --models {sorted(unknown)}; choose from '
                         f'{",".join(MODELS)}')
    return args


def build(name: str, size: int) -> nn.Module:
    """The backbone ``name`` (all four stages' outputs)."""
    if name in BOAT_MODELS:
        family, with_fsla = BOAT_MODELS[name]
        return family(arch='tiny', with_fsla=with_fsla)
    from mmpretrain.models import SwinTransformer

    # pad_small_map: stage maps below 7x7 (small --size) are padded, as
    # BOATSwin does.
    return SwinTransformer(
        arch='tiny',
        img_size=size,
        out_indices=(0, 1, 2, 3),
        pad_small_map=True)


def step_fn(model: nn.Module, img: torch.Tensor,
            dtype: str) -> Callable[[], None]:
    """One training step: forward, a loss on every output, backward."""

    def run():
        for p in model.parameters():
            p.grad = None
        with amp_context(img.device, dtype):
            outs = model(img)
        sum(o.float().mean() for o in outs).backward()

    return run


def peak_mb(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak memory of one call above what was allocated before (CUDA)."""
    if device.type != 'cuda':
        fn()
        return None
    with PeakMemory(device) as mem:
        fn()
    return mem.mb


def run(args, dtype: str) -> Dict[str, dict]:
    """Time every model in interleaved rounds (a change of load hits all
    alike)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    img = torch.randn(args.batch, 3, args.size, args.size, device=device)
    fns = {}
    results: Dict[str, dict] = {}
    for name in args.models:
        model = build(name, args.size).to(device)
        model.train()
        fns[name] = step_fn(model, img, dtype)
        for _ in range(args.warmup):
            fns[name]()
        results[name] = dict(mb=peak_mb(fns[name], device), times=[])
    for _ in range(args.repeats):
        for name, fn in fns.items():
            results[name]['times'].append(timed(fn, device))
    for name, row in results.items():
        row['time'] = statistics.median(row.pop('times'))
        row['ips'] = args.batch / row['time']
        print(
            f'  {dtype} {name}: {row["time"] * 1e3:.1f} ms/step',
            file=sys.stderr,
            flush=True)
    return results


def print_table(results: Dict[str, dict], args, dtype: str) -> None:
    device = torch.device(args.device)
    name = device_name(device)
    print(f'\nBackbone training step ({dtype}): {name}, {args.size}x'
          f'{args.size}, batch {args.batch}, torch {torch.__version__}; '
          f'median of {args.repeats}')
    print('\n| backbone | ms/step | images/s | peak MiB |')
    print('|---|---|---|---|')
    for model, row in results.items():
        mb = f'{row["mb"]:.0f}' if row['mb'] is not None else '-'
        print(f'| {model} | {row["time"] * 1e3:.1f} | {row["ips"]:.1f} | '
              f'{mb} |')

    def ratio(a: str, b: str) -> Optional[float]:
        if a in results and b in results:
            return results[a]['time'] / results[b]['time']
        return None

    print()
    # FSLA's cost in each family, then Swin against mmpretrain's.
    pairs = [(f'boat-{f.family}-t', f'{f.family}-t') for f in boat_families()]
    pairs += [('boat-swin-t', 'mmpretrain-swin-t'),
              ('swin-t', 'mmpretrain-swin-t')]
    for a, b in pairs:
        limit = TARGETS.get((a, b))
        value = ratio(a, b)
        if value is None:
            continue
        target = ''
        if limit is not None and device.type == 'cuda':
            verdict = 'ok' if value <= limit else 'MISSED'
            target = f' (issue #11 target <= {limit}: {verdict})'
        print(f'- step time {a} / {b}: {value:.2f}x{target}')


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes:
        print_table(run(args, dtype), args, dtype)


if __name__ == '__main__':
    main()
