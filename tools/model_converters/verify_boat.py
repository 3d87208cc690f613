# Copyright (c) boat-mm contributors. All rights reserved.
"""Check that boat-mm reproduces the published BOAT models on their weights.

Imports the original model code from a clone of the public implementation
(``--ref-repo``, https://github.com/mahaoyuHKU/pytorch-boat; nothing of it
is part of boat-mm; needs ``timm`` and ``einops``), runs it on the CPU with
its hard-coded ``.cuda()`` calls neutralised, converts its weights with
boat-mm's converter (the one ``boat2mm.py`` uses) and compares at 224x224,
batch 1 and 2, what ``boat_tools.reference.PUBLIC_MODELS`` names (BOAT-Swin:
the tokens after each stage and the logits; BOAT-CSWin: the tokens after
stages 1-3, as the original pairs different images of the batch in the
single FSLA cluster of stage 4). It prints a table of every output: those
compared (batch, dtype, max abs error, tolerance) and those skipped, with
the reason it gives (``PUBLIC_MODELS[...].skipped``), and which weights
it used.

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
from boat2mm import (build_classifier, check_loads, detect_arch,
                     load_original_checkpoint)

from boat_mm.models.backbones import (BaseBOATBackbone, boat_families,
                                      detect_boat_family)
from boat_mm.models.utils.ckpt_convert import pick_boat_weights

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import ArgumentParser, UsageError, tool_main
from boat_tools.reference import (PUBLIC_MODELS, cuda_calls_stay_put,
                                  import_public_module)

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


#: Every output of a published classifier, in the order of the table.
OUTPUTS = ('stage1', 'stage2', 'stage3', 'stage4', 'logits')


def table(family: Family, results: Dict[str, Dict[str, float]],
          tol: float) -> List[str]:
    """The report: one row per output and batch compared (per dtype, with
    the max abs error and the tolerance), one per output skipped (with
    why).

    Args:
        family (type): The family (``PUBLIC_MODELS[family].skipped``).
        results (dict): dtype name -> what :func:`verify` returned.
        tol (float): The tolerance.

    Returns:
        list[str]: The table's lines (markdown).
    """
    lines = [
        '| output | batch | dtype | max abs error | tolerance | '
        'result |', '|---|---|---|---|---|---|'
    ]
    compared = {name.split()[0] for r in results.values() for name in r}
    for output in OUTPUTS:
        if output not in compared:
            reason = PUBLIC_MODELS[family.family].skipped.get(
                output, 'not computed alike by the two codes')
            lines.append(f'| {output} | - | - | - | - | skipped: {reason} |')
            continue
        for dtype, res in results.items():
            for name, diff in res.items():
                out, batch = name.split()
                if out == output:
                    lines.append(
                        f'| {out} | {batch[1:]} | {dtype} | {diff:.3g} | '
                        f'{tol:g} | {"ok" if diff <= tol else "over"} |')
    return lines


def run_case(family: Family,
             arch: str,
             ref: nn.Module,
             tol: float,
             seed: int,
             double: bool,
             weights: str = '') -> bool:
    """Compare one model, in float32 then (if needed) float64, and print
    the table of what was compared and what was skipped."""
    title = f'{family.published.name}-{arch}'
    first = 'float64' if double else 'float32'
    results = {
        first: verify(family, ref, seed=seed, dtype=getattr(torch, first))
    }
    worst = max(results[first].values())
    ok = worst <= tol
    note = ''
    if not ok and not double:
        results['float64'] = verify(
            family, ref, seed=seed, dtype=torch.float64)
        worst64 = max(results['float64'].values())
        ok = worst64 <= tol
        note = (f'float32 differs by {worst:.3g} > {tol:g}; float64 ' +
                (f'agrees ({worst64:.3g}): the float32 difference comes '
                 f'from cluster ranks tied to rounding.'
                 if ok else f'differs too ({worst64:.3g}).'))
    print(f'{title}; weights: {weights}; input 224x224, seed {seed}')
    print('\n'.join(table(family, results, tol)))
    if note:
        print(note)
    return ok


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description='Compare boat-mm with the published BOAT models.')
    parser.add_argument(
        'ckpt',
        nargs='?',
        help='published checkpoint; random weights '
        'if omitted')
    parser.add_argument(
        '--ref-repo',
        required=True,
        help='clone of https://github.com/mahaoyuHKU/pytorch-boat')
    parser.add_argument(
        '--family',
        choices=sorted(FAMILIES),
        help='family to test with random weights (taken from CKPT if given)')
    parser.add_argument(
        '--arch',
        choices=['tiny', 'small', 'base'],
        nargs='+',
        default=['tiny'],
        help='archs to test with random weights')
    parser.add_argument(
        '--ema',
        action='store_true',
        help='use the EMA weights of a BOAT-CSWin file')
    parser.add_argument('--tol', type=float, default=1e-4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--double', action='store_true', help='compare in float64 only')
    args = parser.parse_args(argv)
    if args.ckpt is None and args.family is None:
        parser.error(f'give a checkpoint or --family ({", ".join(FAMILIES)}) '
                     f'for random weights')
    return args


def _public_module(ref_repo: str, family: str):
    """The public code's model module; a missing checkout or a missing
    timm / einops is the user's to fix."""
    try:
        return import_public_module(ref_repo, family)
    except ImportError as err:
        raise UsageError(str(err))


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    ok = True
    if args.ckpt:
        ckpt = load_original_checkpoint(args.ckpt)
        try:
            source_key, weights = pick_boat_weights(ckpt, args.ema)
            family = detect_boat_family(weights)
            info = detect_arch(family, weights)
        except (KeyError, ValueError) as e:
            raise UsageError(f'{args.ckpt}: {e.args[0] if e.args else e}')
        arch = info['arch_name']
        if arch not in ('tiny', 'small', 'base'):
            # The public code builds its zoo's archs only.
            raise UsageError(
                f'{args.ckpt} is a {family.published.name} of a custom arch '
                f'({info["backbone"]["arch"]}), which the public code does '
                f'not build: verify_boat.py compares the published tiny, '
                f'small and base models; pass one of those files, or '
                f'--family {family.family} --arch tiny small base for '
                f'random weights')
        ref = build_reference(
            _public_module(args.ref_repo, family.family), family, arch)
        ref.load_state_dict(weights, strict=True)
        used = (f"'{source_key}' of {args.ckpt}"
                if source_key else f'the top level of {args.ckpt}')
        # A file with EMA weights alone gives them without --ema.
        ema = source_key == 'state_dict_ema'
        used += ' (EMA)' if ema else ' (not EMA)'
        ok = run_case(family, arch, ref, args.tol, args.seed, args.double,
                      used)
    else:
        family = FAMILIES[args.family]
        module = _public_module(args.ref_repo, args.family)
        for i, arch in enumerate(args.arch):
            torch.manual_seed(args.seed + i)
            ref = build_reference(module, family, arch)
            randomise(ref, args.seed + i)
            ok &= run_case(
                family, arch, ref, args.tol, args.seed, args.double,
                f'random (seed {args.seed + i}, norms and biases perturbed)')
    print(
        'PASS' if ok else 'FAIL', f'(every compared output within tol '
        f'{args.tol:g})' if ok else f'(an output exceeds tol {args.tol:g})')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
