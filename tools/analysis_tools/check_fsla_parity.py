# Copyright (c) boat-mm contributors. All rights reserved.
"""Compare boat-mm's FSLA with the published BOAT ``ContentAttention``.

The published module (github.com/mahaoyuHKU/pytorch-boat) is imported from
a checkout given by ``--ref-repo``; its hard-coded ``.cuda()`` is made a
no-op so that it runs on the CPU. Both modules get the same ``qkv``,
``proj`` and ``get_v`` weights and the same input, at the token maps of
stages 1-3 for 224x224 images:

- BOAT-Swin-T: 56x56 (96 channels, 3 heads), 28x28 (192, 6), 14x14 (384, 12),
  logit scale ``head_dim ** -0.5``;
- BOAT-CSWin-T: 56x56 (64, 2), 28x28 (128, 4), 14x14 (256, 8), where the
  original passes ``qk_scale=True``, i.e. a scale of 1.0.

Stage 4 (7x7 = 49 tokens) is left out: the original pairs different images
of the batch there (a defect boat-mm does not copy).

Example::

    mkdir -p /tmp/boat_ref
    git -C PATH/TO/pytorch-boat archive HEAD | tar -x -C /tmp/boat_ref
    python tools/analysis_tools/check_fsla_parity.py --ref-repo /tmp/boat_ref

Needs ``timm`` and ``einops`` (imported by the original files only).
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Tuple, Type

import torch

from boat_mm.models.backbones import BaseBOATBackbone, boat_families
from boat_mm.models.utils import FeatureSpaceLocalAttention

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import ArgumentParser, UsageError, tool_main
from boat_tools.reference import (PUBLIC_MODELS, cuda_calls_stay_put,
                                  import_public_module)


def fsla_cases(family: Type[BaseBOATBackbone]) -> List[Tuple[int, int, int]]:
    """``(side, embed_dims, num_heads)`` of the FSLA inputs of stages 1-3
    of the family's tiny model at 224x224 (stride 4, then halving)."""
    tiny = family.arch_zoo['tiny']
    return [(224 // 2**(i + 2), tiny['embed_dims'][i], tiny['num_heads'][i])
            for i in range(3)]


FAMILIES = {f.family: f for f in boat_families() if f.family in PUBLIC_MODELS}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description='Max abs difference between boat-mm FSLA and the '
        'published ContentAttention')
    parser.add_argument(
        '--ref-repo',
        required=True,
        help='root of a mahaoyuHKU/pytorch-boat checkout')
    parser.add_argument(
        '--family',
        default=','.join(FAMILIES),
        help=f'comma-separated subset of {",".join(FAMILIES)} (default: '
        'all)')
    parser.add_argument(
        '--dtype',
        default='float32,float64',
        help='comma-separated dtypes to compare in')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--atol',
        type=float,
        default=1e-4,
        help='float32 tolerance (float64: atol * 1e-4)')
    parser.add_argument(
        '--max-off',
        type=float,
        default=0.02,
        help='float32 only: share of tokens allowed beyond --atol, for '
        'near-ties that float rounding decides differently in the two '
        'sorts (default 0.02)')
    return parser.parse_args(argv)


def load_content_attention(ref_repo: str, family: str) -> type:
    """Import the original ``ContentAttention`` class of ``family``."""
    try:
        return import_public_module(ref_repo, family).ContentAttention
    except ImportError as err:
        raise UsageError(str(err))


def compare(ref_cls: type, side: int, dims: int, heads: int, our_scale,
            ref_scale, dtype: torch.dtype, batch: int,
            seed: int) -> Tuple[float, float, float]:
    """Max abs difference, max abs output and share of differing tokens."""
    torch.manual_seed(seed)
    ref = ref_cls(
        dims,
        window_size=(7, 7),
        num_heads=heads,
        qkv_bias=True,
        qk_scale=ref_scale)
    ours = FeatureSpaceLocalAttention(dims, heads, qk_scale=our_scale)
    for name in ('qkv', 'proj', 'get_v'):
        getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())
    ref.to(dtype).eval()
    ours.to(dtype).eval()
    x = torch.randn(batch, side * side, dims, dtype=dtype)
    with torch.no_grad(), cuda_calls_stay_put():
        expected = ref(x)
        got = ours(x, (side, side))
    diff = (got - expected).abs()
    # Tokens far off hint at a different clustering, not at rounding.
    far = (diff.amax(-1) > 1e-3 * expected.abs().max()).float().mean()
    return diff.max().item(), expected.abs().max().item(), far.item()


@tool_main
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    families: List[str] = [f.strip() for f in args.family.split(',') if f]
    for family in families:
        if family not in FAMILIES:
            raise UsageError(f'unknown --family {family!r}; choose from '
                             f'{sorted(FAMILIES)}')
    dtypes = []
    for name in args.dtype.split(','):
        dtype = getattr(torch, name.strip(), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UsageError(f'unknown --dtype {name!r}; use float32 and/or '
                             'float64')
        dtypes.append(dtype)

    print(f'batch {args.batch}, seed {args.seed}, torch {torch.__version__}')
    print('| family | tokens | channels/heads | dtype | max abs diff | '
          'max abs output | tokens off |')
    print('|---|---|---|---|---|---|---|')
    failed = False
    for family in families:
        # Our FSLA's default scale (None: head_dim ** -0.5) and the
        # original's argument.
        our_scale = FAMILIES[family].fsla_qk_scale
        ref_scale = PUBLIC_MODELS[family].fsla_qk_scale
        ref_cls = load_content_attention(args.ref_repo, family)
        for side, dims, heads in fsla_cases(FAMILIES[family]):
            for dtype in dtypes:
                diff, scale, far = compare(ref_cls, side, dims, heads,
                                           our_scale, ref_scale, dtype,
                                           args.batch, args.seed)
                if dtype == torch.float64:
                    ok = diff <= args.atol * 1e-4
                else:
                    ok = diff <= args.atol or far <= args.max_off
                failed |= not ok
                print(
                    f'| {family} | {side}x{side} | {dims}/{heads} | '
                    f'{str(dtype).split(".")[-1]} | {diff:.2e} | '
                    f'{scale:.2e} | {100 * far:.2f} % |',
                    flush=True)
    print('tokens off: share of tokens whose output differs by more than '
          '1e-3 x max|output|; in float32 a few can come from near-ties '
          'in the ranking that rounding breaks differently.')
    if failed:
        print('FAILED: a difference exceeds --atol', file=sys.stderr)
        sys.exit(1)
    print('OK')


if __name__ == '__main__':
    main()
