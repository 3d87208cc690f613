# Copyright (c) boat-mm contributors. All rights reserved.
"""Speed and memory of feature-space local attention (FSLA).

Compares, side by side in one process, at several token-map sizes:

- ``fsla``: :class:`boat_mm.models.utils.FeatureSpaceLocalAttention` as
  used by default (``impl='auto'``: on the CPU its clustering and its
  clustered attention run in the C++ kernels, on CUDA in the Triton
  kernels);
- ``fsla-tensor``: the same module with ``clustering_impl='tensor'`` and
  ``attention_impl='tensor'`` (tensor ops and SDPA);
- ``window``: Swin's 7x7 window attention with relative position bias
  (mmseg's ``ShiftWindowMSA`` with ``shift_size=0``);
- ``global``: SDPA over all ``N`` tokens with the same qkv/proj layers
  (flash attention where it applies);
- ``flex``: FSLA's module with its attention replaced by torch's
  FlexAttention over the tokens gathered into cluster order, with a block
  mask of the sibling pairs (compiled with ``torch.compile`` on CUDA);
- ``public``: the published ``ContentAttention`` (only with ``--ref-repo``,
  at the sizes it supports; on the CPU by making ``Tensor.cuda`` a no-op).

It reports forward (no grad) and forward+backward time (median of repeats
after warm-up; CUDA: CUDA events), the peak memory of each (CUDA:
``max_memory_allocated``; CPU: the peak resident set size, reset through
``/proc/self/clear_refs``), the share of the FSLA forward spent
clustering, and the ratios that issues #3 (CPU) and #11 (GPU) set targets
for, once per ``--dtypes`` entry (``bf16``: under bfloat16 autocast).

Example::

    python benchmarks/fsla.py --threads 2
    python benchmarks/fsla.py --quick --ref-repo /tmp/boat_ref_fsla
    python benchmarks/fsla.py --device cuda --ref-repo /tmp/boat_ref_fsla
"""
import argparse
import os.path as osp
import statistics
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from _timing import (PeakMemory, add_device_args, amp_context, device_name,
                     parse_dtypes, timed)

from boat_mm.models.utils import FeatureSpaceLocalAttention
from boat_mm.ops import (balanced_hierarchical_clustering, build_cluster_plan,
                         inverse_slots)

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
from boat_tools.reference import cuda_calls_stay_put, import_public_module

GROUP_SIZE, OVERLAP = 49, 20
# (side, embed_dims, num_heads)
MAIN_SHAPES = [(s, c, h) for c, h in ((64, 2), (256, 8))
               for s in (56, 128, 256)]
ANCHOR_SHAPES = [(56, 64, 2), (28, 128, 4), (14, 256, 8)]
QUICK_SHAPES = [(56, 64, 2), (28, 128, 4), (14, 256, 8), (128, 64, 2)]
# BOAT-CSWin-T at a 512x512 crop, then at a 224 image (issue #11).
GPU_SHAPES = [(128, 64, 2), (64, 128, 4), (32, 256, 8), (56, 64, 2),
              (28, 128, 4), (14, 256, 8)]
# --quick on CUDA: one shape of each kind.
GPU_QUICK_SHAPES = [(128, 64, 2), (56, 64, 2)]
METHODS = ('fsla', 'fsla-tensor', 'window', 'global', 'flex', 'public')
# FSLA variants: the implementation (clustering and attention) of each.
FSLA_IMPLS = {'fsla': 'auto', 'fsla-tensor': 'tensor'}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument(
        '--batch',
        type=int,
        default=None,
        help='default: 2 on the CPU, 8 on CUDA')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='CPU: anchor shapes and 128^2 (C=64) only; CUDA: 128^2 and '
        '56^2 (C=64)')
    parser.add_argument(
        '--shapes',
        default=None,
        help='comma-separated side:C:heads (e.g. 14:32:2,28:64:2) instead '
        'of the presets')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument(
        '--budget',
        type=float,
        default=20.,
        help='seconds per measurement; fewer repeats beyond it')
    parser.add_argument(
        '--global-max-gflop',
        type=float,
        default=600.,
        help='skip global attention whose forward needs more GFLOP')
    parser.add_argument(
        '--ref-repo',
        default=None,
        help='checkout of mahaoyuHKU/pytorch-boat, to time its '
        'ContentAttention (needs timm and einops)')
    parser.add_argument(
        '--methods',
        default=','.join(METHODS),
        help='comma-separated subset of ' + ','.join(METHODS))
    args = parser.parse_args()
    cuda = torch.device(args.device).type == 'cuda'
    if args.batch is None:
        args.batch = 8 if cuda else 2
    parse_dtypes(args)
    return args


# ---------------------------------------------------------------------------
# The attention variants, all called as module(x, (H, W)).
# ---------------------------------------------------------------------------


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens (SDPA)."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads,
                                   -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class WindowAttention(nn.Module):
    """mmseg's Swin W-MSA (7x7 windows, relative position bias)."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        from mmseg.models.backbones.swin import ShiftWindowMSA
        self.attn = ShiftWindowMSA(
            embed_dims, num_heads, window_size=7, shift_size=0)

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        return self.attn(x, hw_shape)


class FlexFSLA(FeatureSpaceLocalAttention):
    """FSLA with its attention run by torch's FlexAttention.

    The clustering, the local term and the layers are FSLA's; q, k and v
    are gathered into cluster order (slot order of the plan) and
    ``flex_attention`` runs over all slots with a block mask that allows
    exactly FSLA's (query, key) pairs inside each sibling pair (the plan's
    ``attn_mask``), then the outputs are gathered back to raster order.
    The mask depends on slot positions only, so it is built once per
    plan.
    """

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__(embed_dims, num_heads, GROUP_SIZE, OVERLAP)
        from torch.nn.attention.flex_attention import flex_attention
        self.flex = flex_attention
        self.masks: Dict[tuple, object] = {}

    def compile_flex(self) -> None:
        """Compile flex_attention (its fused kernels; eager runs a slow
        reference implementation)."""
        self.flex = torch.compile(self.flex, dynamic=False)

    def _block_mask(self, plan, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask
        key = (plan.num_tokens, device)
        if key not in self.masks:
            two_s = 2 * plan.slot_size
            local = plan.attn_mask
            if local.dim() == 2:
                local = local.unsqueeze(0)
            uniform = local.shape[0] == 1

            def mask_mod(b, h, q_idx, kv_idx):
                pair = q_idx // two_s
                same = pair == kv_idx // two_s
                pair = pair * 0 if uniform else pair
                return same & local[pair, q_idx % two_s, kv_idx % two_s]

            slots = plan.num_pairs * two_s
            self.masks[key] = create_block_mask(
                mask_mod, None, None, slots, slots, device=device)
        return self.masks[key]

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        B, N, C = x.shape
        H, W = hw_shape
        h, d = self.num_heads, self.head_dims
        qkv = self.qkv(x)
        plan = self._plan(N, x.device)
        perm = self._cluster(qkv, plan)
        slots = plan.slot_valid.numel()
        # (3, B, h, N, d) -> gathered along tokens into slot order.
        qkv_h = qkv.view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
        index = perm[:, :slots].view(1, B, h, slots,
                                     1).expand(3, B, h, slots, d)
        q, k, v = qkv_h.gather(3, index).unbind(0)
        out = self.flex(
            q,
            k,
            v,
            block_mask=self._block_mask(plan, x.device),
            scale=self.scale)
        # Back to raster order: each token from its real slot.
        inv = inverse_slots(perm, plan).view(B, h, N, 1).expand(B, h, N, d)
        out = out.gather(2, inv).transpose(1, 2).reshape(B, N, C)
        v_img = qkv[..., 2 * C:].transpose(1, 2).reshape(B, C, H, W)
        out = out + self.get_v(v_img).flatten(2).transpose(1, 2)
        return self.proj(out)


class PublicFSLA(nn.Module):
    """The published ContentAttention behind our calling convention."""

    def __init__(self, cls: type, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.attn = cls(embed_dims, window_size=(7, 7), num_heads=num_heads)

    @staticmethod
    def supports(side: int) -> bool:
        n = side * side // GROUP_SIZE
        return (side * side == n * GROUP_SIZE and n >= 2 and n & (n - 1) == 0)

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        return self.attn(x)


def load_public_class(ref_repo: str) -> type:
    """Import ``ContentAttention`` from a pytorch-boat checkout."""
    return import_public_module(ref_repo, 'swin').ContentAttention


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


def measure_all(fns: Dict[Tuple[str, str], Callable[[], None]],
                device: torch.device, args) -> Dict[Tuple[str, str], dict]:
    """Time the callables in interleaved rounds (so that a change of load
    hits them all alike) and take the peak memory of each.

    Returns:
        dict: Per key ``time`` (median seconds), ``runs`` and ``mb``.
    """
    out = {key: dict(times=[]) for key in fns}
    for key, fn in fns.items():
        # The first call warms up and gives the peak memory; a call that
        # already exceeds half the budget is timed by it alone.
        with PeakMemory(device) as mem:
            first = timed(fn, device)
        out[key]['mb'] = mem.mb
        if first > args.budget / 2:
            out[key]['times'].append(first)
            continue
        for _ in range(args.warmup - 1):
            fn()
    active = [k for k in fns if not out[k]['times']]
    for _ in range(args.repeats):
        for key in list(active):
            out[key]['times'].append(timed(fns[key], device))
            if sum(out[key]['times']) > args.budget:
                active.remove(key)
        if not active:
            break
    for row in out.values():
        row['time'] = statistics.median(row['times'])
        row['runs'] = len(row.pop('times'))
    return out


def forward_fn(module: nn.Module,
               x: torch.Tensor,
               hw: Tuple[int, int],
               dtype: str = 'fp32') -> Callable[[], None]:

    def run():
        with torch.no_grad(), amp_context(x.device, dtype):
            module(x, hw)

    return run


def train_fn(module: nn.Module,
             x: torch.Tensor,
             hw: Tuple[int, int],
             dtype: str = 'fp32') -> Callable[[], None]:
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        with amp_context(x.device, dtype):
            out = module(x, hw)
        out.backward(grad.to(out.dtype))

    return run


def clustering_fn(module: FeatureSpaceLocalAttention,
                  x: torch.Tensor,
                  num_heads: int,
                  impl: str,
                  dtype: str = 'fp32') -> Callable[[], None]:
    """Only the clustering step of FSLA on the module's own queries (in
    the dtype the module gives them)."""
    B, N, C = x.shape
    with torch.no_grad(), amp_context(x.device, dtype):
        q = module.qkv(x)[..., :C].reshape(B, N, num_heads, -1)
        q = q.transpose(1, 2).reshape(B * num_heads, N, -1).contiguous()
    plan = build_cluster_plan(N, GROUP_SIZE, OVERLAP, device=x.device)

    def run():
        with torch.no_grad(), amp_context(x.device, dtype):
            balanced_hierarchical_clustering(q, plan, impl=impl)

    return run


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


def global_gflop(batch: int, n: int, c: int) -> float:
    """Forward GFLOP of softmax(QK^T)V over all tokens."""
    return 4 * batch * n * n * c / 1e9


def build_methods(side: int, dims: int, heads: int, methods: List[str],
                  public_cls: Optional[type],
                  args) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
    """The modules to time at one shape, and the reasons for skips."""
    N = side * side
    modules: Dict[str, nn.Module] = {}
    skipped: Dict[str, str] = {}
    for name in methods:
        if name in FSLA_IMPLS:
            modules[name] = FeatureSpaceLocalAttention(
                dims,
                heads,
                group_size=GROUP_SIZE,
                overlap=OVERLAP,
                clustering_impl=FSLA_IMPLS[name],
                attention_impl=FSLA_IMPLS[name])
        elif name == 'window':
            modules[name] = WindowAttention(dims, heads)
        elif name == 'flex':
            modules[name] = FlexFSLA(dims, heads)
            if torch.device(args.device).type == 'cuda':
                modules[name].compile_flex()
            elif N > 64 * 64:
                del modules[name]
                skipped[name] = 'eager FlexAttention on the CPU: small only'
        elif name == 'global':
            gflop = global_gflop(args.batch, N, dims)
            if gflop > args.global_max_gflop:
                skipped[name] = (
                    f'skipped: {gflop:.0f} GFLOP forward > '
                    f'--global-max-gflop {args.global_max_gflop:g}')
            else:
                modules[name] = GlobalAttention(dims, heads)
        elif name == 'public' and public_cls is not None:
            if PublicFSLA.supports(side):
                modules[name] = PublicFSLA(public_cls, dims, heads)
            else:
                skipped[name] = 'original needs N = 49 * 2^L, L >= 1'
    return modules, skipped


def run_shape(side: int,
              dims: int,
              heads: int,
              methods: List[str],
              public_cls: Optional[type],
              device: torch.device,
              args,
              dtype: str = 'fp32') -> Dict[str, dict]:
    hw = (side, side)
    torch.manual_seed(0)
    x = torch.randn(args.batch, side * side, dims, device=device)
    modules, skipped = build_methods(side, dims, heads, methods, public_cls,
                                     args)
    fns = {}
    for name, module in modules.items():
        module.to(device).train()
        fns[name, 'fwd'] = forward_fn(module, x, hw, dtype)
        if name != 'flex' or device.type == 'cuda':
            # (FlexAttention has no backward on the CPU.)
            fns[name, 'train'] = train_fn(module, x, hw, dtype)
        if name in FSLA_IMPLS:
            fns[name, 'cluster'] = clustering_fn(module, x, heads,
                                                 FSLA_IMPLS[name], dtype)
    with cuda_calls_stay_put(device):
        measured = measure_all(fns, device, args)
    results: Dict[str, dict] = {
        name: dict(skip=why)
        for name, why in skipped.items()
    }
    for (name, kind), row in measured.items():
        res = results.setdefault(name, {})
        res[kind] = row['time']
        res[kind + '_mb'] = row['mb']
        res[kind + '_runs'] = row['runs']
    for name, row in results.items():
        if 'fwd' in row:
            print(
                f'  {dtype} {side}^2 C={dims} h={heads} {name}: '
                f'fwd {row["fwd"] * 1e3:.1f} ms, '
                f'fwd+bwd {fmt_ms(row, "train")} ms '
                f'({row["fwd_runs"]} runs)',
                file=sys.stderr,
                flush=True)
    return results


def fmt_ms(row: dict, key: str) -> str:
    return f'{row[key] * 1e3:.1f}' if key in row else '-'


def fmt_mb(row: dict, key: str) -> str:
    value = row.get(key)
    return f'{value:.0f}' if value is not None else '-'


def ratio(a: dict, b: dict, key: str = 'train') -> Optional[float]:
    if key in a and key in b:
        return a[key] / b[key]
    return None


def mem_ratio(a: dict, b: dict) -> Optional[float]:
    """Ratio of the fwd+bwd peak memory."""
    if a.get('train_mb') and b.get('train_mb'):
        return a['train_mb'] / b['train_mb']
    return None


def fmt_ratio(value: Optional[float]) -> str:
    return f'{value:.2f}x' if value is not None else '-'


def print_tables(all_results, args, dtype: str = 'fp32') -> None:
    device = torch.device(args.device)
    print(f'\nFSLA benchmark ({dtype}): {device_name(device)}, '
          f'batch={args.batch}, torch {torch.__version__}; times are '
          f'medians in ms, memory is the peak extra MiB')
    print('\n| tokens | C/heads | method | fwd ms | fwd+bwd ms | '
          'fwd MiB | fwd+bwd MiB | note |')
    print('|---|---|---|---|---|---|---|---|')
    for (side, dims, heads), results in all_results.items():
        for name, row in results.items():
            if not row:
                continue
            print(f'| {side}^2 | {dims}/{heads} | {name} | '
                  f'{fmt_ms(row, "fwd")} | {fmt_ms(row, "train")} | '
                  f'{fmt_mb(row, "fwd_mb")} | {fmt_mb(row, "train_mb")} | '
                  f'{row.get("skip", "")} |')

    def share(row: dict) -> str:
        if 'cluster' not in row:
            return '-'
        return f'{100 * row["cluster"] / row["fwd"]:.0f} %'

    print('\n| tokens | C/heads | fsla/window | fsla/global | fsla/public '
          '| fsla/flex | clustering share of fwd | fsla fwd+bwd us/token '
          '| fsla-tensor/window | fsla-tensor clustering share '
          '| fsla/window fwd+bwd MiB |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for (side, dims, heads), res in all_results.items():
        fsla = res.get('fsla', {})
        tensor = res.get('fsla-tensor', {})
        per_token = (f'{fsla["train"] * 1e6 / (args.batch * side**2):.2f}'
                     if 'train' in fsla else '-')
        print(f'| {side}^2 | {dims}/{heads} | '
              f'{fmt_ratio(ratio(fsla, res.get("window", {})))} | '
              f'{fmt_ratio(ratio(fsla, res.get("global", {})))} | '
              f'{fmt_ratio(ratio(fsla, res.get("public", {})))} | '
              f'{fmt_ratio(ratio(fsla, res.get("flex", {})))} | '
              f'{share(fsla)} | {per_token} | '
              f'{fmt_ratio(ratio(tensor, res.get("window", {})))} | '
              f'{share(tensor)} | '
              f'{fmt_ratio(mem_ratio(fsla, res.get("window", {})))} |')
    print('(ratios are fwd+bwd times, except the last column)')

    def check(label, value, limit):
        if value is None:
            print(f'- {label}: not measured')
        else:
            verdict = 'ok' if value <= limit else 'MISSED'
            print(f'- {label}: {value:.2f} (target <= {limit}) {verdict}')

    if device.type == 'cuda':
        print(f'\nTargets of issue #11 ({dtype}; set for bf16, fwd+bwd):')
        for (side, dims, heads), res in all_results.items():
            check(f'fsla/window at {side}^2 C={dims} h={heads}',
                  ratio(res.get('fsla', {}), res.get('window', {})), 2.)
        res = all_results.get((56, 64, 2), {})
        check('fsla/public at 56^2 C=64 h=2',
              ratio(res.get('fsla', {}), res.get('public', {})), 0.25)
        for (side, dims, heads), res in all_results.items():
            if side == 128:
                check(f'fsla/window peak memory at 128^2 C={dims}',
                      mem_ratio(res.get('fsla', {}), res.get('window', {})),
                      1.5)
        return

    print('\nTargets of issue #3 (fwd+bwd):')
    for shape in ANCHOR_SHAPES:
        res = all_results.get(shape, {})
        check(f'fsla/window at {shape[0]}^2 C={shape[1]} h={shape[2]}',
              ratio(res.get('fsla', {}), res.get('window', {})), 2.5)
    res = all_results.get((56, 64, 2), {})
    check('fsla/public at 56^2 C=64 h=2',
          ratio(res.get('fsla', {}), res.get('public', {})), 0.3)
    for (side, dims, heads), res in all_results.items():
        if side == 128:
            check(f'fsla/global at 128^2 C={dims} h={heads}',
                  ratio(res.get('fsla', {}), res.get('global', {})), 0.1)
    shares = [(k, r['fsla']['cluster'] / r['fsla']['fwd'])
              for k, r in all_results.items()
              if 'cluster' in r.get('fsla', {})]
    if shares:
        worst = max(shares, key=lambda kv: kv[1])
        check(
            f'clustering share of fwd (worst, at {worst[0][0]}^2 '
            f'C={worst[0][1]})', worst[1], 0.3)
    for dims, heads in sorted({(c, h) for _, c, h in all_results}):
        sizes = sorted(s for s, c, h in all_results if (c, h) == (
            dims, heads) and 'train' in all_results[s, c, h].get('fsla', {}))
        if len(sizes) > 1:
            times = {
                s: all_results[s, dims, heads]['fsla']['train']
                for s in sizes
            }
            growth = ', '.join(
                f'{s}^2: x{times[s] / times[sizes[0]]:.1f} time for '
                f'x{(s / sizes[0])**2:.1f} tokens' for s in sizes[1:])
            print(f'- growth C={dims} h={heads} (vs {sizes[0]}^2): {growth}')


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f'unknown --methods {sorted(unknown)}; choose from '
                         f'{", ".join(METHODS)}')
    public_cls = None
    if 'public' in methods and args.ref_repo:
        public_cls = load_public_class(args.ref_repo)
    if args.shapes:
        shapes = [
            tuple(int(v) for v in shape.split(':'))
            for shape in args.shapes.split(',')
        ]
    elif device.type == 'cuda':
        shapes = GPU_QUICK_SHAPES if args.quick else GPU_SHAPES
    else:
        shapes = QUICK_SHAPES if args.quick else list(
            dict.fromkeys(ANCHOR_SHAPES + MAIN_SHAPES))
    for dtype in args.dtypes:
        all_results = {}
        for side, dims, heads in shapes:
            all_results[side, dims,
                        heads] = run_shape(side, dims, heads, methods,
                                           public_cls, device, args, dtype)
        print_tables(all_results, args, dtype)


if __name__ == '__main__':
    main()
