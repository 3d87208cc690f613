# Copyright (c) boat-mm contributors. All rights reserved.
"""Count the parameters and FLOPs of a model built from a config.

Like the ``get_flops.py`` of mmpretrain, mmsegmentation and mmdetection, for
any of their configs (chosen by the config's ``default_scope``). FLOPs are
multiply-adds (the OpenMMLab convention: mmengine's ``FlopAnalyzer``,
which also adds per-element estimates for norms; the multiply-adds alone
are printed too), counted by
:func:`boat_mm.analysis.complexity.get_model_complexity`, which adds what
mmengine's counter misses in BOAT: ``scaled_dot_product_attention``
(masked pair-wise attention counted by its allowed pairs unless
``--masked-attention dense``) and the FSLA clustering.

* classification (mmpretrain): the whole classifier (backbone, neck,
  head) on a ``1 x 3 x H x W`` input, by default the size its test pipeline
  crops to (else its validation pipeline's, else its training crop, as
  for a SimMIM config, which has no test pipeline; 224 x 224 if none
  fixes a size), as the metafiles count;
* segmentation (mmseg): the inference model (backbone + decode head; the
  auxiliary head is removed, as upstream) on a ``1 x 3 x H x W`` input,
  by default the training crop (``data_preprocessor.size``; 512 x 512
  without one);
* detection (mmdet): backbone, neck and dense heads, and a two-stage
  detector's RoI head on 1000 fixed proposals (mask head on 100), without
  post-processing (mmdet's convention, see
  :class:`boat_mm.analysis.complexity.DetectorForward`), on a ``1 x 3 x H x
  W`` input, default 800 x 1280 (H x W, the size the Swin and CSWin papers
  count at).

The data preprocessor is not run, so ``--shape`` is the size the network
sees.

Examples::

    python tools/analysis_tools/get_flops.py \
        configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py
    python tools/analysis_tools/get_flops.py \
        configs/boat_upernet_ade20k.py --shape 512 512
    python tools/analysis_tools/get_flops.py \
        configs/boat_swin/mask-rcnn_boat-swin-tiny_fpn_1x_coco.py
    python tools/analysis_tools/get_flops.py --check-reference
"""
import argparse
import os.path as osp
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

# The tools' shared code (tools/boat_tools); imported before mmengine, as it
# silences mmengine's warnings that are not the user's concern.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (ArgumentParser, UsageError, add_shape_arg,
                            load_config, tool_main)
from boat_tools.config import add_cfg_options_arg
from mmengine.analysis.print_helper import (complexity_stats_str,
                                            complexity_stats_table)
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope

import boat_mm  # noqa: F401,E402  (registers the BOAT models)
from boat_mm.analysis.complexity import DetectorForward, get_model_complexity
from boat_mm.utils.metafile import REPO_ROOT, published_complexity

SCOPES = {
    'mmpretrain': ('mmpretrain.registry', (224, 224)),
    'mmseg': ('mmseg.registry', (512, 512)),
    'mmdet': ('mmdet.registry', (800, 1280)),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(
        description='Get the params and FLOPs (multiply-adds) of a model')
    parser.add_argument(
        'config',
        nargs='?',
        help='config file (not needed with '
        '--check-reference)')
    add_shape_arg(
        parser, 'the input size; default: the crop of the test pipeline '
        '(classification; else of validation, else of training; 224 if '
        'none) or of training '
        '(data_preprocessor.size, segmentation; 512 if none), 800 1280 for '
        'detection')
    parser.add_argument(
        '--masked-attention',
        choices=['allowed', 'dense'],
        default='allowed',
        help='count boolean-masked attention by its allowed (query, key) '
        'pairs (default; the cost of the algorithm) or densely (what a '
        'masked kernel executes)')
    parser.add_argument(
        '--show-table',
        action='store_true',
        help='print the per-module complexity table of mmengine')
    parser.add_argument(
        '--show-arch',
        action='store_true',
        help='print the model with per-module complexity')
    parser.add_argument(
        '--check-reference',
        action='store_true',
        help='count the BOAT ImageNet classifiers of published weights '
        '(configs/*/metafile.yml) at 224 and compare with the published '
        'params and multiply-adds (slow: minutes)')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=0.03,
        help='relative tolerance of --check-reference on multiply-adds '
        '(params must match to 0.01M). Default 0.03')
    add_cfg_options_arg(parser)
    args = parser.parse_args(argv)
    if args.config is None and not args.check_reference:
        parser.error('give a CONFIG, or --check-reference')
    return args


class ScopeError(UsageError):
    """The config is not an mmpretrain, mmseg or mmdet config."""


def build_model(cfg: Config) -> Tuple[Any, str]:
    """Build the inference model of a config, in the config's scope
    (an mmdet detector wrapped in :class:`DetectorForward`)."""
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ScopeError(
            f'get_flops.py handles mmpretrain, mmseg and mmdet configs '
            f'(their `default_scope`), got default_scope={scope!r}; inherit '
            f'the _base_/default_runtime.py of one of them (e.g. '
            f'mmseg::_base_/default_runtime.py).')
    init_default_scope(scope)
    registry = __import__(SCOPES[scope][0], fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None):
        # Training-only head, not part of inference (as upstream).
        model.auxiliary_head = None
    # SyncBN cannot run outside a process group; the count is the same.
    model = revert_sync_batchnorm(model)
    if scope == 'mmdet':
        model = DetectorForward(model)
    return model, scope


# Transforms that give every image one size, with the order of their size
# argument: mmcv's CenterCrop and Resize take (w, h), mmpretrain's
# RandomResizedCrop (h, w); the EfficientNet crops take one int.
_SIZED_TRANSFORMS = {
    'CenterCrop': ('crop_size', 'wh'),
    'Resize': ('scale', 'wh'),
    'RandomResizedCrop': ('scale', 'hw'),
    'EfficientNetCenterCrop': ('crop_size', 'hw'),
    'EfficientNetRandomCrop': ('scale', 'hw'),
}


def _pipeline_size(pipeline: Sequence[dict]) -> Optional[Tuple[int, int]]:
    """The ``(H, W)`` the last size-fixing transform of ``pipeline`` gives,
    or None if none fixes one (e.g. ``ResizeEdge`` alone)."""
    for t in reversed(list(pipeline or [])):
        name = str(t.get('type', '')).split('.')[-1]
        if name not in _SIZED_TRANSFORMS or (name == 'Resize'
                                             and t.get('keep_ratio')):
            continue
        size = t.get(_SIZED_TRANSFORMS[name][0])
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            a, b = (int(v) for v in size)
            return (b, a) if _SIZED_TRANSFORMS[name][1] == 'wh' else (a, b)
    return None


def default_shape(cfg: Config, scope: str) -> Tuple[Tuple[int, int], str]:
    """The input size get_flops counts at when ``--shape`` is not given.

    Args:
        cfg (Config): The loaded config.
        scope (str): Its ``default_scope``.

    Returns:
        tuple: ``(H, W)`` and where it comes from, in words.
    """
    if scope == 'mmpretrain':
        for loader in ('test_dataloader', 'val_dataloader',
                       'train_dataloader'):
            dataset = (cfg.get(loader) or {}).get('dataset') or {}
            size = _pipeline_size(dataset.get('pipeline'))
            if size is not None:
                return size, f'the crop of {loader}\'s pipeline'
    elif scope == 'mmseg':
        size = (cfg.model.get('data_preprocessor') or {}).get('size')
        if size is not None:
            return tuple(size), 'model.data_preprocessor.size'
    return SCOPES[scope][1], f'the {scope} default'


def count_config(config: str,
                 shape: Optional[Sequence[int]] = None,
                 cfg_options: Optional[dict] = None,
                 masked_attention: str = 'allowed') -> Dict[str, Any]:
    """Build the model of ``config`` and count its params and FLOPs.

    Args:
        config (str): Config file.
        shape (Sequence[int], optional): ``(H, W)`` or ``(S, )``;
            :func:`default_shape` when None.
        cfg_options (dict, optional): Overrides merged into the config.
        masked_attention (str): ``'allowed'`` or ``'dense'``.

    Returns:
        dict: The result of :func:`get_model_complexity` plus ``scope``,
        ``model`` and ``shape_from`` (where a default size came from, or
        None).
    """
    cfg = load_config(config, cfg_options)
    model, scope = build_model(cfg)
    shape_from = None
    if shape is None:
        shape, shape_from = default_shape(cfg, scope)
    hw = (shape[0], shape[0]) if len(shape) == 1 else tuple(shape)
    info = get_model_complexity(
        model, input_shape=(3, *hw), masked_attention=masked_attention)
    info['scope'] = scope
    info['shape_from'] = shape_from
    info['model'] = model
    return info


def _warn_uncounted(uncounted: Dict[str, int]) -> None:
    if not uncounted:
        return
    ops = ', '.join(f'{k} x{v}' for k, v in sorted(uncounted.items()))
    print(f'WARNING: operators without a FLOP count (element-wise '
          f'arithmetic, softmax, activations, ...; the OpenMMLab '
          f'convention counts multiply-adds and norms only): {ops}')


def _print_result(config: str, info: Dict[str, Any]) -> None:
    split_line = '=' * 60
    rows = [
        ('Config', config),
        ('Scope', info['scope']),
        ('Input shape', str(info['input_shape'])),
        *([('  from', f'{info["shape_from"]} (--shape H W to change)')]
          if info.get('shape_from') else []),
        ('Params (M)', f'{info["params"] / 1e6:.2f}'),
        ('FLOPs (G)', f'{info["flops"] / 1e9:.2f}'),
        ('  multiply-adds only (G)', f'{info["macs"] / 1e9:.2f}'),
    ]
    for op, n in sorted(info['by_operator'].items(), key=lambda x: -x[1]):
        rows.append((f'    {op} (G)', f'{n / 1e9:.4f}'))
    width = max(len(r[0]) for r in rows)
    print(split_line)
    for key, value in rows:
        print(f'{key:<{width}}  {value}')
    print(split_line)
    print('FLOPs = multiply-adds (OpenMMLab convention) plus mmengine\'s '
          'per-element estimates for norms, upsampling and pooling; see '
          'boat_mm/analysis/complexity.py for what is counted.')
    _warn_uncounted(info['uncounted_ops'])


def check_reference(tolerance: float,
                    masked_attention: str = 'allowed') -> bool:
    """Count the classifiers with published params and multiply-adds (the
    ``Converted From`` numbers of ``configs/*/metafile.yml``) at 224 and
    compare.

    Args:
        tolerance (float): Relative tolerance on multiply-adds.
        masked_attention (str): ``'allowed'`` or ``'dense'``.

    Returns:
        bool: True if all params match (0.01M) and all multiply-adds lie
        within ``tolerance`` of the published numbers.
    """
    header = (f'{"model":<28} {"params(M)":>9} {"ref":>6} {"MACs(G)":>8} '
              f'{"ref":>6} {"diff":>6} {"attn":>6} {"clust":>6} '
              f'{"FLOPs(G)":>8} ok')
    lines, all_ok = [header, '-' * len(header)], True
    print(header, flush=True)
    for rel, model in published_complexity().items():
        ref_params = model.published_params / 1e6
        ref_macs = model.published_flops / 1e9
        info = count_config(
            osp.join(REPO_ROOT, rel), (224, 224),
            masked_attention=masked_attention)
        by_op = info['by_operator']
        params, macs = info['params'] / 1e6, info['macs'] / 1e9
        diff = macs / ref_macs - 1
        ok = abs(params - ref_params) < 0.01 and abs(diff) <= tolerance
        all_ok &= ok
        name = osp.basename(rel).split('_')[0]
        line = (f'{name:<28} {params:>9.2f} {ref_params:>6.2f} '
                f'{macs:>8.3f} {ref_macs:>6.2f} {diff:>+6.1%} '
                f'{by_op["sdpa"] / 1e9:>6.3f} '
                f'{by_op["fsla_clustering"] / 1e9:>6.3f} '
                f'{info["flops"] / 1e9:>8.3f} {"yes" if ok else "NO"}')
        print(line, flush=True)
        lines.append(line)
    print('\n' + '\n'.join(lines))
    print(f'MACs: multiply-adds (linear, conv, matmul, attention, FSLA '
          f'clustering), the unit of the references; attn: the part of '
          f'it in scaled_dot_product_attention (masks counted '
          f'"{masked_attention}"), clust: in the FSLA clustering. FLOPs '
          f'adds mmengine\'s norm estimates. Tolerance {tolerance:.0%}.')
    return all_ok


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.check_reference:
        return 0 if check_reference(args.tolerance,
                                    args.masked_attention) else 1
    info = count_config(args.config, args.shape, args.cfg_options,
                        args.masked_attention)
    if args.show_arch:
        print(complexity_stats_str(flops=info['analyzer']))
    if args.show_table:
        print(complexity_stats_table(flops=info['analyzer']))
    _print_result(args.config, info)
    return 0


if __name__ == '__main__':
    sys.exit(main())
