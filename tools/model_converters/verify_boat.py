# Copyright (c) boat-mm contributors. All rights reserved.
"""Compare boat-mm with the published BOAT models on the same weights.

Imports the original model code from a clone of the public implementation
(``--ref-repo``; nothing of it is part of boat-mm), runs it on the CPU with
its ``.cuda()`` calls neutralised, converts its weights with boat-mm's
converter and compares:

* BOAT-Swin: logits at 224x224 (batch 1 and 2);
* BOAT-CSWin: features after stages 1-3 (stage 4 is a single FSLA cluster
  at 224, where the original pairs different images of the batch; boat-mm
  does not, by design) and, for batch 1, ... (the original crashes there).

Without CKPT, the original is randomly initialised. Needs timm and einops
(the original's dependencies).

Example::

    python tools/model_converters/verify_boat.py --ref-repo ../pytorch-boat \
        --family cswin --arch tiny
"""
import argparse
import os.path as osp
import sys
from contextlib import contextmanager
from typing import Dict, List

import torch
from mmengine.registry import init_default_scope

import boat_mm  # noqa: F401
from boat_mm.models.utils.ckpt_convert import convert_boat_checkpoint

REF_NAMES = {
    'cswin': {
        'tiny': 'CSWin_64_12211_tiny_224',
        'small': 'CSWin_64_24322_small_224',
        'base': 'CSWin_96_24322_base_224'
    },
    'swin': {
        'tiny': (96, [2, 2, 6, 2], [3, 6, 12, 24]),
        'small': (96, [2, 2, 18, 2], [3, 6, 12, 24]),
        'base': (128, [2, 2, 18, 2], [4, 8, 16, 32])
    }
}


@contextmanager
def no_cuda():
    """Let the original's hard-coded ``.cuda()`` run on the CPU."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def build_reference(ref_repo: str, family: str, arch: str):
    folder = osp.join(ref_repo, 'BOAT-CSWin' if family == 'cswin' else
                      'BOAT-Swin')
    if not osp.isdir(folder):
        raise FileNotFoundError(
            f'{folder} not found: --ref-repo must point to a clone of the '
            f'public BOAT implementation (with BOAT-Swin/ and BOAT-CSWin/).')
    sys.path.insert(0, folder)
    if family == 'cswin':
        from models.cswin_boat import CSWinTransformer  # noqa
        import models.cswin_boat as ref
        model = getattr(ref, REF_NAMES['cswin'][arch])()
    else:
        from models.boat_swin_transformer import SwinTransformer
        dims, depths, heads = REF_NAMES['swin'][arch]
        model = SwinTransformer(
            img_size=224, embed_dim=dims, depths=depths, num_heads=heads,
            window_size=7)
    return model.eval()


def build_ours(family: str, arch: str) -> torch.nn.Module:
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    backbone = dict(
        type='BOATCSWin' if family == 'cswin' else 'BOATSwin',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.)
    width = {'tiny': 512, 'small': 512, 'base': 768} if family == 'cswin' \
        else {'tiny': 768, 'small': 768, 'base': 1024}
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=backbone,
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=1000,
                in_channels=width[arch]))).eval()


def cswin_stage_features(ref, x: torch.Tensor) -> List[torch.Tensor]:
    feats = []
    x = ref.stage1_conv_embed(x)
    for blk in ref.stage1:
        x = blk(x)
    feats.append(x)
    for merge, blocks in zip([ref.merge1, ref.merge2],
                             [ref.stage2, ref.stage3]):
        x = merge(x)
        for blk in blocks:
            x = blk(x)
        feats.append(x)
    return feats


def compare(family: str, arch: str, ref_repo: str, ckpt: str = None,
            double: bool = False) -> Dict[str, float]:
    torch.manual_seed(0)
    with no_cuda():
        ref = build_reference(ref_repo, family, arch)
    if ckpt:
        state = torch.load(ckpt, map_location='cpu', weights_only=False)
        ref.load_state_dict(
            state.get('model', state.get('state_dict', state)), strict=True)
    ours = build_ours(family, arch)
    _, converted = convert_boat_checkpoint({'state_dict': ref.state_dict()})
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    # Only our extra per-stage output norms may be missing.
    missing = [k for k in missing if not k.startswith('backbone.norm')]
    if missing or unexpected:
        raise KeyError(f'missing {missing}, unexpected {unexpected}')
    dtype = torch.float64 if double else torch.float32
    ref.to(dtype)
    ours.to(dtype)
    results = {}
    for batch in (1, 2):
        x = torch.randn(batch, 3, 224, 224, dtype=dtype)
        with torch.no_grad(), no_cuda():
            if family == 'swin':
                diff = (ref(x) - ours(x)).abs().max().item()
                results[f'logits b{batch}'] = diff
            else:
                ref_feats = cswin_stage_features(ref, x)
                our_feats = ours.backbone.forward_stages(x)
                for i in range(3):
                    r = ref_feats[i]
                    o = our_feats[i].flatten(2).transpose(1, 2)
                    results[f'stage{i + 1} b{batch}'] = \
                        (r - o).abs().max().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('ckpt', nargs='?', help='published checkpoint')
    parser.add_argument('--ref-repo', required=True)
    parser.add_argument('--family', choices=['swin', 'cswin'],
                        default='cswin')
    parser.add_argument(
        '--arch', choices=['tiny', 'small', 'base'], nargs='+',
        default=['tiny'])
    parser.add_argument('--tol', type=float, default=1e-4)
    parser.add_argument(
        '--double', action='store_true',
        help='compare in float64: near-ties of the clustering ranks, which '
        'float32 rounding may break differently, then vanish')
    args = parser.parse_args()
    worst = 0.
    for arch in args.arch:
        res = compare(args.family, arch, args.ref_repo, args.ckpt,
                      args.double)
        for name, diff in res.items():
            print(f'BOAT-{args.family}-{arch:5s} {name:12s} '
                  f'max abs diff {diff:.3g}')
            worst = max(worst, diff)
    print('PASS' if worst <= args.tol else 'FAIL', f'(tol {args.tol})')
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == '__main__':
    main()
