# Copyright (c) boat-mm contributors. All rights reserved.
"""Check that boat-mm reproduces the published BOAT models on their weights.

Imports the original model code from a clone of the public implementation
(``--ref-repo``, https://github.com/mahaoyuHKU/pytorch-boat; nothing of it
is part of boat-mm; needs ``timm`` and ``einops``), runs it on the CPU with
its hard-coded ``.cuda()`` calls neutralised, converts its weights with
boat-mm's converter (the one ``boat2mm.py`` uses) and compares at 224x224,
batch 1 and 2, what ``boat_tools.reference.PUBLIC_MODELS`` names (BOAT-Swin:
the logits; BOAT-CSWin: the features after stages 1-3, as the original
pairs different images of the batch in the single FSLA cluster of stage
4).

With CKPT (a published file) the family and arch come from the file;
without it the original is randomly initialised (norms and biases
perturbed so that they matter) for each ``--arch`` of ``--family``.

FSLA ranks tokens by a ratio of cosines; where two ratios tie to float32
rounding the two implementations may order them differently and the outputs
then differ in a few tokens. If float32 misses ``--tol``, the comparison is
repeated in float64, where such near-ties vanish: agreement there means the
computation is the same (exit status 0, with a note).

Examples::

    python tools/model_converters/verify_boat.py --ref-repo ../pytorch-boat \
        --family swin --arch tiny small base
    python tools/model_converters/verify_boat.py --ref-repo ../pytorch-boat \
        cswin_tiny.pth.tar --ema
"""
import argparse
import os.path as osp
import sys
import warnings
from typing import Dict, List, Optional, Type, Union

import torch
from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from boat2mm import (build_classifier, check_loads,  # noqa: E402
                     detect_arch, load_original_checkpoint)

from boat_mm.models.backbones import (BaseBOATBackbone,  # noqa: E402
                                      boat_families, detect_boat_family)
from boat_mm.models.utils.ckpt_convert import pick_boat_weights  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.reference import (  # noqa: E402
    PUBLIC_MODELS, cuda_calls_stay_put, import_public_module)

Family = Type[BaseBOATBackbone]
FAMILIES: Dict[str, Family] = {f.family: f for f in boat_families()}


def build_reference(module, family: Union[str, Family],
                    arch: str) -> nn.Module:
    """The original classifier at 224 pixels, without stochastic depth."""
    if isinstance(family, str):
        family = FAMILIES[family]
    with cuda_calls_stay_put(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = PUBLIC_MODELS[family.family].build(module, arch)
    return model.eval()


def randomise(model: nn.Module, seed: int) -> None:
    """Perturb the norms and biases (initialised to 1 and 0) so that a
    wrongly mapped one shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def verify(family: Family,
           ref: nn.Module,
           batches=(1, 2),
           seed: int = 0,
           dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """Convert ``ref``'s weights, build boat-mm's classifier, compare what
    the family's public code computes alike (``PUBLIC_MODELS``).

    Returns:
        dict: ``'<output> b<batch>'`` -> max abs difference.
    """
    weights = {k: v for k, v in ref.state_dict().items()}
    converted = family.published.convert(weights)
    ours = build_classifier(family, detect_arch(family, weights)).eval()
    check_loads(ours, converted)
    ref = ref.to(dtype)
    ours = ours.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=gen).to(dtype)
        with torch.no_grad(), cuda_calls_stay_put():
            pairs = PUBLIC_MODELS[family.family].outputs(ref, ours, x)
        for name, (theirs, mine) in pairs.items():
            results[f'{name} b{batch}'] = (theirs - mine).abs().max().item()
    ref.float()
    return results


def _report(title: str, results: Dict[str, float]) -> float:
    for name, diff in results.items():
        print(f'{title:22s} {name:10s} max abs diff {diff:.3g}')
    return max(results.values())


def run_case(family: Family, arch: str, ref: nn.Module, tol: float,
             seed: int, double: bool) -> bool:
    """Compare one model, in float32 then (if needed) float64."""
    title = f'{family.published.name}-{arch}'
    dtypes = [torch.float64] if double else [torch.float32]
    worst = _report(f'{title} ({"f64" if double else "f32"})',
                    verify(family, ref, seed=seed, dtype=dtypes[0]))
    if worst <= tol:
        return True
    if double:
        return False
    print(f'{title}: float32 differs by {worst:.3g} > {tol:g}; repeating in '
          f'float64 to separate FSLA near-ties from real differences')
    worst64 = _report(f'{title} (f64)',
                      verify(family, ref, seed=seed, dtype=torch.float64))
    if worst64 <= tol:
        print(f'{title}: float64 agrees ({worst64:.3g}): the float32 '
              f'difference comes from cluster ranks tied to rounding.')
        return True
    return False


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Compare boat-mm with the published BOAT models.')
    parser.add_argument(
        'ckpt', nargs='?', help='published checkpoint; random weights '
        'if omitted')
    parser.add_argument(
        '--ref-repo', required=True,
        help='clone of https://github.com/mahaoyuHKU/pytorch-boat')
    parser.add_argument(
        '--family', choices=sorted(FAMILIES),
        help='family to test with random weights (taken from CKPT if given)')
    parser.add_argument(
        '--arch', choices=['tiny', 'small', 'base'], nargs='+',
        default=['tiny'], help='archs to test with random weights')
    parser.add_argument('--ema', action='store_true',
                        help='use the EMA weights of a BOAT-CSWin file')
    parser.add_argument('--tol', type=float, default=1e-4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--double', action='store_true',
        help='compare in float64 only')
    args = parser.parse_args(argv)
    if args.ckpt is None and args.family is None:
        parser.error(f'give a checkpoint or --family ({", ".join(FAMILIES)}) '
                     f'for random weights')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    ok = True
    if args.ckpt:
        ckpt = load_original_checkpoint(args.ckpt)
        try:
            _, weights = pick_boat_weights(ckpt, args.ema)
        except KeyError as e:
            print(f'error: {e.args[0]}', file=sys.stderr)
            return 1
        family = detect_boat_family(weights)
        arch = detect_arch(family, weights)['arch_name']
        if arch not in ('tiny', 'small', 'base'):
            print(f'error: {args.ckpt} is not one of the published '
                  f'tiny/small/base models', file=sys.stderr)
            return 1
        ref = build_reference(
            import_public_module(args.ref_repo, family.family), family, arch)
        ref.load_state_dict(weights, strict=True)
        ok = run_case(family, arch, ref, args.tol, args.seed, args.double)
    else:
        family = FAMILIES[args.family]
        module = import_public_module(args.ref_repo, args.family)
        for i, arch in enumerate(args.arch):
            torch.manual_seed(args.seed + i)
            ref = build_reference(module, family, arch)
            randomise(ref, args.seed + i)
            ok &= run_case(family, arch, ref, args.tol, args.seed,
                           args.double)
    print('PASS' if ok else 'FAIL', f'(tol {args.tol:g})')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
