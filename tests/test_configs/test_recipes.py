# Copyright (c) boat-mm contributors. All rights reserved.
"""Every shipped config carries its recipe, key by key.

The tables below are written from the recipes the configs follow, not from
the configs:

* BOAT-Swin on ImageNet-1K: the public BOAT-Swin code (the Swin training
  code: ``BOAT-Swin/config.py`` and its ``swin_*_patch4_window7_224.yaml``;
  = mmpretrain's Swin recipe ``imagenet_bs1024_adamw_swin.py``): AdamW
  5e-4 x 1024 / 512 = 1e-3, weight decay 0.05 (none on 1-D weights, biases
  and position tables), 300 epochs, 20 warm-up epochs from 5e-7 x 2 = 1e-6,
  cosine to 5e-6 x 2 = 1e-5, gradient clipping 5, label smoothing 0.1,
  mixup 0.8 / cutmix 1.0, RandAugment m9-mstd0.5, random erasing 0.25,
  bicubic 224 crops (test: 256 then 224), drop path 0.2 / 0.3 / 0.5,
  each process seeded with seed + rank (``BOAT-Swin/main.py``).
* BOAT-CSWin on ImageNet-1K: ``BOAT-CSWin/README.md`` (the three training
  commands) and ``main.py``'s defaults (timm): batch 8 x 256, lr 2e-3, wd
  0.05, EMA 0.99984, drop path 0.2 (T) / 0.4 (S); batch 8 x 128, lr 1e-3,
  wd 0.1, EMA 0.99992, drop path 0.5 (B); 20 warm-up epochs from 1e-6,
  cosine to 1e-5, 300 epochs, no gradient clipping, no decay on 1-D
  weights and biases, test crop ratio 0.9 (248 then 224), each process
  seeded with seed + rank.
* UPerNet on ADE20K: ``BOAT-CSWin/segmentation/configs/cswin/
  upernet_cswin_*.py`` (= mmseg's Swin UPerNet recipe): AdamW 6e-5, betas
  (0.9, 0.999), wd 0.01 (none on norms and position tables), 1500 linear
  warm-up iterations from a ratio 1e-6, poly (power 1) to 0, 160k
  iterations, 8 x 2 images, 512x512 crops, drop path 0.3 / 0.4 / 0.6;
  the BOAT-Swin configs take the same recipe (configs/boat_swin/README.md).
* Mask R-CNN on COCO: mmdet's Swin Mask R-CNN configs
  (``mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``, ``..._ms-crop-3x_coco.py``):
  AdamW 1e-4, betas (0.9, 0.999), wd 0.05 (none on norms and position
  tables), 1000 linear warm-up iterations from 0.001, steps x0.1 after
  epochs 8 and 11 of 12 (3x: 27 and 33 of 36), 8 x 2 images, 1333x800
  (3x: DETR's multi-scale + crop), drop path 0.2 for tiny and small alike
  (``mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py`` keeps its Swin-T
  base's 0.2).
* RetinaNet on COCO: mmdet's ``retinanet_swin-t-p4-w7_fpn_1x_coco.py``:
  mmdet's 1x schedule (SGD, momentum 0.9, wd 1e-4 on every parameter,
  500 linear warm-up iterations from 0.001, steps x0.1 after epochs 8 and
  11 of 12) at lr 0.01, 8 x 2 images, 1333x800, drop path 0.2, stages 2-4
  (``out_indices=(1, 2, 3)``) into a P3-P7 FPN. mmdet has no Swin-S
  RetinaNet or 1x Swin-S Mask R-CNN config: the small configs take the
  tiny recipe, as mmdet's Swin-S 3x config takes its Swin-T one.
* The two CPU demos: the recipes their configs and the READMEs state.

Head and neck widths are checked by a forward of the full model (random
weights, a 64x64 input) for one model of each family and task, and
against the backbone's arch widths for the others.
"""
import copy
import importlib
import math
import os.path as osp
import re
from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import boat_mm  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ABSENT = object()  # the key must not be set

_LOADED: Dict[str, Config] = {}


def _cfg(path: str) -> Config:
    """The built (fully inherited) config; loaded once, copied out."""
    if path not in _LOADED:
        _LOADED[path] = Config.fromfile(osp.join(ROOT, 'configs', path))
    return copy.deepcopy(_LOADED[path])


def _get(cfg: Any, path: str) -> Any:
    """Value at a dotted path; ``@Type`` picks the one list item (pipeline
    step, hook, scheduler) of that type; a number indexes a list."""
    node = cfg
    for part in path.split('.'):
        if part.startswith('@'):
            items = [
                x for x in node
                if isinstance(x, dict) and x.get('type') == part[1:]
            ]
            assert len(items) <= 1, f'{path}: {len(items)} x {part[1:]}'
            if not items:
                return ABSENT
            node = items[0]
        elif isinstance(node, (list, tuple)):
            node = node[int(part)]
        elif part in node:
            node = node[part]
        else:
            return ABSENT
    return node


def _plain(value: Any) -> Any:
    """Config containers as plain lists/dicts (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(got: Any, want: Any) -> bool:
    if want is ABSENT:
        return got is ABSENT or got is None
    got, want = _plain(got), _plain(want)
    if isinstance(want, float) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15)
    return got == want


# ---------------------------------------------------------------------------
# The recipes.
# ---------------------------------------------------------------------------

# Stage widths of the papers' models (BOAT-Swin: Swin's; BOAT-CSWin:
# CSWin's), written out rather than read from the arch zoo.
SWIN_WIDTHS = {
    'tiny': [96, 192, 384, 768],
    'small': [96, 192, 384, 768],
    'base': [128, 256, 512, 1024],
}
CSWIN_WIDTHS = {
    'tiny': [64, 128, 256, 512],
    'small': [64, 128, 256, 512],
    'base': [96, 192, 384, 768],
}

# The ImageNet-1K augmentation both families share (Swin / timm defaults).
IN1K_AUG = {
    # seed + rank in each process (Swin's main.py, timm's random_seed).
    'randomness.diff_rank_seed':
    True,
    'model.head.num_classes':
    1000,
    'model.head.loss.type':
    'LabelSmoothLoss',
    'model.head.loss.label_smooth_val':
    0.1,
    'model.train_cfg.augments':
    [dict(type='Mixup', alpha=0.8),
     dict(type='CutMix', alpha=1.0)],
    'train_dataloader.dataset.pipeline.@RandomResizedCrop.scale':
    224,
    'train_dataloader.dataset.pipeline.@RandomResizedCrop.interpolation':
    'bicubic',
    'train_dataloader.dataset.pipeline.@RandomFlip.prob':
    0.5,
    'train_dataloader.dataset.pipeline.@RandAugment.num_policies':
    2,
    'train_dataloader.dataset.pipeline.@RandAugment.magnitude_level':
    9,
    'train_dataloader.dataset.pipeline.@RandAugment.magnitude_std':
    0.5,
    'train_dataloader.dataset.pipeline.@RandomErasing.erase_prob':
    0.25,
    'val_dataloader.dataset.pipeline.@CenterCrop.crop_size':
    224,
    'val_dataloader.dataset.pipeline.@ResizeEdge.interpolation':
    'bicubic',
    'train_cfg.max_epochs':
    300,
    'optim_wrapper.optimizer.type':
    'AdamW',
    'optim_wrapper.optimizer.betas': (0.9, 0.999),
    'optim_wrapper.optimizer.eps':
    1e-8,
    # No decay on 1-D weights (norms) and biases, nor position tables.
    'optim_wrapper.paramwise_cfg.norm_decay_mult':
    0.0,
    'optim_wrapper.paramwise_cfg.bias_decay_mult':
    0.0,
    'param_scheduler.0.type':
    'LinearLR',
    'param_scheduler.0.by_epoch':
    True,
    'param_scheduler.0.end':
    20,
    'param_scheduler.0.convert_to_iter_based':
    True,
    'param_scheduler.1.type':
    'CosineAnnealingLR',
    'param_scheduler.1.by_epoch':
    True,
    'param_scheduler.1.begin':
    20,
    'param_scheduler.1.eta_min':
    1e-5,
    'model.backbone.out_indices': (3, ),
}


def swin_cls(arch: str, drop_path: float) -> Dict[str, Any]:
    lr = 1e-3
    return {
        **IN1K_AUG,
        'model.backbone.type': 'BOATSwin',
        'model.backbone.arch': arch,
        'model.backbone.drop_path_rate': drop_path,
        'model.head.in_channels': SWIN_WIDTHS[arch][3],
        'gpus x batch': (16, 64),
        'auto_scale_lr.base_batch_size': 1024,
        'optim_wrapper.optimizer.lr': lr,
        'optim_wrapper.optimizer.weight_decay': 0.05,
        'optim_wrapper.clip_grad.max_norm': 5.0,
        # Warm-up from 1e-6.
        'param_scheduler.0.start_factor': 1e-6 / lr,
        'val_dataloader.dataset.pipeline.@ResizeEdge.scale': 256,
        'custom_hooks': ABSENT,  # no EMA in the Swin recipe
    }


def cswin_cls(arch: str, drop_path: float, lr: float, weight_decay: float,
              gpus_batch: tuple, ema: float) -> Dict[str, Any]:
    return {
        **IN1K_AUG,
        'model.backbone.type': 'BOATCSWin',
        'model.backbone.arch': arch,
        'model.backbone.drop_path_rate': drop_path,
        'model.head.in_channels': CSWIN_WIDTHS[arch][3],
        'gpus x batch': gpus_batch,
        'auto_scale_lr.base_batch_size': gpus_batch[0] * gpus_batch[1],
        'optim_wrapper.optimizer.lr': lr,
        'optim_wrapper.optimizer.weight_decay': weight_decay,
        'optim_wrapper.clip_grad': ABSENT,
        # timm's warm-up starts at --warmup-lr 1e-6 whatever the lr.
        'param_scheduler.0.start_factor': 1e-6 / lr,
        # mmengine's EMA momentum is 1 - timm's decay (every iteration).
        'custom_hooks.@EMAHook.momentum': 1 - ema,
        # crop_pct 0.9: int(224 / 0.9) = 248.
        'val_dataloader.dataset.pipeline.@ResizeEdge.scale': 248,
    }


def upernet(family: str, arch: str, drop_path: float) -> Dict[str, Any]:
    widths = (SWIN_WIDTHS if family == 'swin' else CSWIN_WIDTHS)[arch]
    train = 'train_dataloader.dataset.pipeline.'
    return {
        'model.backbone.type':
        'BOATSwin' if family == 'swin' else 'BOATCSWin',
        'model.backbone.arch':
        arch,
        'model.backbone.drop_path_rate':
        drop_path,
        'model.backbone.out_indices': (0, 1, 2, 3),
        'model.backbone.init_cfg':
        dict(
            type='Pretrained',
            checkpoint=f'checkpoints/boat-{family}-{arch}_in1k.pth',
            prefix='backbone.'),
        'model.decode_head.type':
        'UPerHead',
        'model.decode_head.in_channels':
        widths,
        'model.decode_head.in_index': [0, 1, 2, 3],
        'model.decode_head.pool_scales': (1, 2, 3, 6),
        'model.decode_head.channels':
        512,
        'model.decode_head.num_classes':
        150,
        'model.decode_head.norm_cfg.type':
        'SyncBN',
        'model.auxiliary_head.type':
        'FCNHead',
        'model.auxiliary_head.in_index':
        2,
        'model.auxiliary_head.in_channels':
        widths[2],
        'model.auxiliary_head.channels':
        256,
        'model.auxiliary_head.num_classes':
        150,
        'model.auxiliary_head.norm_cfg.type':
        'SyncBN',
        'model.auxiliary_head.loss_decode.loss_weight':
        0.4,
        'model.test_cfg.mode':
        'whole',
        'model.data_preprocessor.size': (512, 512),
        train + '@RandomCrop.crop_size': (512, 512),
        train + '@RandomCrop.cat_max_ratio':
        0.75,
        train + '@RandomResize.scale': (2048, 512),
        train + '@RandomResize.ratio_range': (0.5, 2.0),
        train + '@RandomFlip.prob':
        0.5,
        'gpus x batch': (8, 2),
        'auto_scale_lr.base_batch_size':
        16,
        'train_cfg.type':
        'IterBasedTrainLoop',
        'train_cfg.max_iters':
        160000,
        'optim_wrapper.optimizer.type':
        'AdamW',
        'optim_wrapper.optimizer.lr':
        6e-5,
        'optim_wrapper.optimizer.betas': (0.9, 0.999),
        'optim_wrapper.optimizer.weight_decay':
        0.01,
        'optim_wrapper.clip_grad':
        ABSENT,
        'param_scheduler.0.type':
        'LinearLR',
        'param_scheduler.0.start_factor':
        1e-6,
        'param_scheduler.0.by_epoch':
        False,
        'param_scheduler.0.begin':
        0,
        'param_scheduler.0.end':
        1500,
        'param_scheduler.1.type':
        'PolyLR',
        'param_scheduler.1.power':
        1.0,
        'param_scheduler.1.eta_min':
        0.0,
        'param_scheduler.1.by_epoch':
        False,
        'param_scheduler.1.begin':
        1500,
        'param_scheduler.1.end':
        160000,
    }


def detector(family: str, arch: str, method: str,
             schedule: str) -> Dict[str, Any]:
    widths = (SWIN_WIDTHS if family == 'swin' else CSWIN_WIDTHS)[arch]
    epochs, steps = dict(x1=(12, [8, 11]), x3=(36, [27, 33]))[schedule]
    recipe = {
        'model.backbone.type':
        'BOATSwin' if family == 'swin' else 'BOATCSWin',
        'model.backbone.arch':
        arch,
        # mmdet's Swin-S config keeps its Swin-T base's 0.2.
        'model.backbone.drop_path_rate':
        0.2,
        'model.backbone.init_cfg':
        dict(
            type='Pretrained',
            checkpoint=f'checkpoints/boat-{family}-{arch}_in1k.pth',
            prefix='backbone.'),
        'gpus x batch': (8, 2),
        'auto_scale_lr.base_batch_size':
        16,
        'train_cfg.max_epochs':
        epochs,
        'optim_wrapper.optimizer.type':
        'AdamW',
        'optim_wrapper.optimizer.lr':
        1e-4,
        'optim_wrapper.optimizer.betas': (0.9, 0.999),
        'optim_wrapper.optimizer.weight_decay':
        0.05,
        'optim_wrapper.clip_grad':
        ABSENT,
        'param_scheduler.0.type':
        'LinearLR',
        'param_scheduler.0.start_factor':
        0.001,
        'param_scheduler.0.by_epoch':
        False,
        'param_scheduler.0.begin':
        0,
        'param_scheduler.0.end':
        1000,
        'param_scheduler.1.type':
        'MultiStepLR',
        'param_scheduler.1.by_epoch':
        True,
        'param_scheduler.1.begin':
        0,
        'param_scheduler.1.end':
        epochs,
        'param_scheduler.1.milestones':
        steps,
        'param_scheduler.1.gamma':
        0.1,
        'train_dataloader.dataset.pipeline.@RandomFlip.prob':
        0.5,
    }
    if schedule == 'x1':
        recipe['train_dataloader.dataset.pipeline.@Resize.scale'] = (1333, 800)
        recipe['train_dataloader.dataset.pipeline.@Resize.keep_ratio'] = True
    else:
        scales = [(s, 1333) for s in range(480, 801, 32)]
        choice = 'train_dataloader.dataset.pipeline.@RandomChoice.transforms.'
        recipe.update({
            choice + '0.0.scales':
            scales,
            choice + '1.0.scales': [(400, 1333), (500, 1333), (600, 1333)],
            choice + '1.1.crop_type':
            'absolute_range',
            choice + '1.1.crop_size': (384, 600),
            choice + '1.1.allow_negative_crop':
            True,
            choice + '1.2.scales':
            scales,
        })
    if method == 'mask-rcnn':
        recipe.update({
            'model.type': 'MaskRCNN',
            'model.backbone.out_indices': (0, 1, 2, 3),
            'model.neck.in_channels': widths,
            'model.neck.num_outs': 5,
        })
    else:
        recipe.update({
            'model.type': 'RetinaNet',
            'model.backbone.out_indices': (1, 2, 3),
            'model.neck.in_channels': widths[1:],
            'model.neck.start_level': 0,
            'model.neck.add_extra_convs': 'on_input',
            'model.neck.num_outs': 5,
            # mmdet's 1x schedule at lr 0.01, as its Swin RetinaNet.
            'optim_wrapper.optimizer.type': 'SGD',
            'optim_wrapper.optimizer.lr': 0.01,
            'optim_wrapper.optimizer.momentum': 0.9,
            'optim_wrapper.optimizer.betas': ABSENT,
            'optim_wrapper.optimizer.weight_decay': 1e-4,
            'optim_wrapper.paramwise_cfg': ABSENT,
            'param_scheduler.0.end': 500,
        })
    return recipe


def seg_demo() -> Dict[str, Any]:
    # configs/demo/boat-cswin-tiny_upernet_demo.py and README.md: 128x128
    # crops, reduced-width BOAT-CSWin, 8 classes, BN heads, no ImageNet
    # init, AdamW 1e-3 (wd 0.01), 2000 iterations of batch 4, 200 warm-up.
    train = 'train_dataloader.dataset.pipeline.'
    return {
        'model.backbone.type':
        'BOATCSWin',
        'model.backbone.arch':
        dict(
            embed_dims=32,
            depths=[1, 2, 4, 1],
            num_heads=[2, 4, 8, 16],
            split_sizes=[1, 2, 7, 7]),
        'model.backbone.drop_path_rate':
        0.1,
        'model.backbone.init_cfg':
        None,
        'model.decode_head.in_channels': [32, 64, 128, 256],
        'model.decode_head.num_classes':
        8,
        'model.decode_head.norm_cfg.type':
        'BN',
        'model.auxiliary_head.in_channels':
        128,
        'model.auxiliary_head.num_classes':
        8,
        'model.auxiliary_head.norm_cfg.type':
        'BN',
        'model.data_preprocessor.size': (128, 128),
        train + '@RandomCrop.crop_size': (128, 128),
        train + '@PhotoMetricDistortion':
        ABSENT,
        'train_dataloader.batch_size':
        4,
        'auto_scale_lr.base_batch_size':
        4,
        'train_cfg.max_iters':
        2000,
        'optim_wrapper.optimizer.type':
        'AdamW',
        'optim_wrapper.optimizer.lr':
        1e-3,
        'optim_wrapper.optimizer.weight_decay':
        0.01,
        'param_scheduler.0.type':
        'LinearLR',
        'param_scheduler.0.end':
        200,
        'param_scheduler.1.type':
        'PolyLR',
        'param_scheduler.1.begin':
        200,
        'param_scheduler.1.end':
        2000,
    }


def det_demo() -> Dict[str, Any]:
    # configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py and
    # configs/boat_cswin/README.md: 160x160 images, the reduced-width
    # BOAT-CSWin, 64-channel FPN and heads, 6 categories, no ImageNet
    # init, AdamW 1e-3, 800 iterations of batch 2.
    return {
        'model.backbone.type': 'BOATCSWin',
        'model.backbone.drop_path_rate': 0.1,
        'model.backbone.init_cfg': None,
        'model.neck.in_channels': [32, 64, 128, 256],
        'model.neck.out_channels': 64,
        'model.rpn_head.in_channels': 64,
        'model.rpn_head.anchor_generator.scales': [4],
        'model.roi_head.bbox_head.num_classes': 6,
        'model.roi_head.mask_head.num_classes': 6,
        'train_dataloader.dataset.pipeline.@Resize.scale': (160, 160),
        'train_dataloader.batch_size': 2,
        'auto_scale_lr.base_batch_size': 2,
        'train_cfg.type': 'IterBasedTrainLoop',
        'train_cfg.max_iters': 800,
        'optim_wrapper.optimizer.type': 'AdamW',
        'optim_wrapper.optimizer.lr': 1e-3,
        'optim_wrapper.optimizer.weight_decay': 0.05,
        'param_scheduler.0.type': 'LinearLR',
        'param_scheduler.0.end': 50,
        'param_scheduler.1.type': 'MultiStepLR',
        'param_scheduler.1.by_epoch': False,
        'param_scheduler.1.milestones': [600, 740],
    }


def simmim(family: str) -> Dict[str, Any]:
    """mmpretrain's SimMIM Swin-B recipe (``simmim_swin-base-w6_8xb256-amp-
    coslr-100e_in1k-192px.py``) on a base BOAT model: AdamW 2e-4 x 2048 /
    512, wd 0.05, clipping 5, AMP, 10 warm-up epochs from 1e-6, cosine to
    1e-5 x 2048 / 512 at epoch 100, 192 px crops, 32 px mask patches at
    ratio 0.6 on the stride-4 token grid, drop path 0.1, windows of 6."""
    lr = 2e-4 * 2048 / 512
    mask = 'train_dataloader.dataset.pipeline.@SimMIMMaskGenerator.'
    recipe = {
        'model.type':
        'SimMIM',
        'model.backbone.type':
        'SimMIMBOATSwin' if family == 'swin' else 'SimMIMBOATCSWin',
        'model.backbone.arch':
        'base',
        'model.backbone.drop_path_rate':
        0.1,
        'model.backbone.out_indices': (3, ),
        'model.neck.type':
        'SimMIMLinearDecoder',
        'model.neck.in_channels':
        (SWIN_WIDTHS if family == 'swin' else CSWIN_WIDTHS)['base'][3],
        'model.neck.encoder_stride':
        32,
        'model.head.patch_size':
        4,
        'gpus x batch': (8, 256),
        'auto_scale_lr.base_batch_size':
        2048,
        'optim_wrapper.type':
        'AmpOptimWrapper',
        'optim_wrapper.optimizer.type':
        'AdamW',
        'optim_wrapper.optimizer.lr':
        lr,
        'optim_wrapper.optimizer.weight_decay':
        0.05,
        'optim_wrapper.clip_grad.max_norm':
        5.0,
        'param_scheduler.0.start_factor':
        1e-6 / 2e-4,
        'param_scheduler.0.end':
        10,
        'param_scheduler.1.type':
        'CosineAnnealingLR',
        'param_scheduler.1.eta_min':
        1e-5 * 2048 / 512,
        'param_scheduler.1.end':
        100,
        'train_cfg.max_epochs':
        100,
        mask + 'input_size':
        192,
        mask + 'mask_patch_size':
        32,
        mask + 'model_patch_size':
        4,
        mask + 'mask_ratio':
        0.6,
    }
    if family == 'swin':
        recipe['model.backbone.window_size'] = 6
    return recipe


def simmim_fine_tuning(family: str, size: int) -> Dict[str, Any]:
    """mmpretrain's SimMIM Swin-B fine-tuning recipe
    (``simmim/benchmarks/swin-base-w6_8xb256-coslr-100e_in1k-192px.py``
    and ``swin-base-w7_8xb256-coslr-100e_in1k.py``) on a base BOAT model
    initialised from its SimMIM pre-training: AdamW 5e-3, wd 0.05 (none on
    norms, biases and position tables), layer-wise lr decay 0.9, clipping
    5, AMP, 20 warm-up epochs from 2.5e-7 x 2048 / 512 (a factor of
    2.5e-7 / 1.25e-3), cosine to 2.5e-7 x 2048 / 512 at epoch 100, drop
    path 0.1, crops of 192 (test: 219 then 192) or 224 (256 then 224),
    windows of 6 or 7 for BOAT-Swin."""
    pre = ('simmim_boat-swin-base-w6' if family == 'swin' else
           'simmim_boat-cswin-base') + '_8xb256-amp-coslr-100e_in1k-192px'
    recipe = {
        **IN1K_AUG,
        'model.backbone.type':
        'BOATSwin' if family == 'swin' else 'BOATCSWin',
        'model.backbone.arch':
        'base',
        'model.backbone.drop_path_rate':
        0.1,
        'model.backbone.init_cfg':
        dict(
            type='Pretrained',
            checkpoint=f'work_dirs/{pre}/epoch_100.pth',
            prefix='backbone.'),
        'model.head.in_channels':
        (SWIN_WIDTHS if family == 'swin' else CSWIN_WIDTHS)['base'][3],
        'gpus x batch': (8, 256),
        'auto_scale_lr.base_batch_size':
        2048,
        'optim_wrapper.type':
        'AmpOptimWrapper',
        'optim_wrapper.constructor':
        'LearningRateDecayOptimWrapperConstructor',
        'optim_wrapper.paramwise_cfg':
        dict(
            layer_decay_rate=0.9,
            custom_keys={
                '.norm': dict(decay_mult=0.0),
                '.bias': dict(decay_mult=0.0),
                '.absolute_pos_embed': dict(decay_mult=0.0),
                '.relative_position_bias_table': dict(decay_mult=0.0)
            }),
        'optim_wrapper.optimizer.lr':
        5e-3,
        'optim_wrapper.optimizer.weight_decay':
        0.05,
        'optim_wrapper.clip_grad.max_norm':
        5.0,
        'param_scheduler.0.start_factor':
        2.5e-7 / 1.25e-3,
        'param_scheduler.1.T_max':
        80,
        'param_scheduler.1.eta_min':
        2.5e-7 * 2048 / 512,
        'param_scheduler.1.end':
        100,
        'train_cfg.max_epochs':
        100,
        'randomness.seed':
        0,
        'train_dataloader.dataset.pipeline.@RandomResizedCrop.scale':
        size,
        'val_dataloader.dataset.pipeline.@CenterCrop.crop_size':
        size,
        'val_dataloader.dataset.pipeline.@ResizeEdge.scale':
        219 if size == 192 else 256,
    }
    # The recipe's own keys, not those of the from-scratch recipes.
    for key in ('optim_wrapper.optimizer.betas', 'optim_wrapper.optimizer.eps',
                'optim_wrapper.paramwise_cfg.norm_decay_mult',
                'optim_wrapper.paramwise_cfg.bias_decay_mult'):
        del recipe[key]
    if family == 'swin':
        recipe['model.backbone.window_size'] = 6 if size == 192 else 7
    return recipe


FINE_TUNED = {
    (family, size):
    f'boat_{family}/boat-{family}-base'
    f'{("-w6" if size == 192 else "-w7") if family == "swin" else ""}'
    f'_simmim-100e-pre_8xb256-coslr-100e_in1k'
    f'{"-192px" if size == 192 else ""}.py'
    for family in ('swin', 'cswin')
    for size in (192, 224)
}


def _recipes() -> Dict[str, Dict[str, Any]]:
    table = {}
    for arch, dpr in (('tiny', 0.2), ('small', 0.3), ('base', 0.5)):
        table[f'boat_swin/boat-swin-{arch}_16xb64_in1k.py'] = swin_cls(
            arch, dpr)
    table['boat_cswin/boat-cswin-tiny_8xb256_in1k.py'] = cswin_cls(
        'tiny', 0.2, 2e-3, 0.05, (8, 256), 0.99984)
    table['boat_cswin/boat-cswin-small_8xb256_in1k.py'] = cswin_cls(
        'small', 0.4, 2e-3, 0.05, (8, 256), 0.99984)
    table['boat_cswin/boat-cswin-base_8xb128_in1k.py'] = cswin_cls(
        'base', 0.5, 1e-3, 0.1, (8, 128), 0.99992)
    for family in ('swin', 'cswin'):
        for arch, dpr in (('tiny', 0.3), ('small', 0.4), ('base', 0.6)):
            table[f'boat_{family}/boat-{family}-{arch}_upernet_8xb2-160k_'
                  'ade20k-512x512.py'] = upernet(family, arch, dpr)
        for arch in ('tiny', 'small'):
            name = f'boat-{family}-{arch}'
            table[f'boat_{family}/mask-rcnn_{name}_fpn_1x_coco.py'] = \
                detector(family, arch, 'mask-rcnn', 'x1')
            table[f'boat_{family}/mask-rcnn_{name}_fpn_ms-crop-3x_coco.py'] = \
                detector(family, arch, 'mask-rcnn', 'x3')
            table[f'boat_{family}/retinanet_{name}_fpn_1x_coco.py'] = \
                detector(family, arch, 'retinanet', 'x1')
    table['boat_swin/simmim_boat-swin-base-w6_8xb256-amp-coslr-100e_'
          'in1k-192px.py'] = simmim('swin')
    table['boat_cswin/simmim_boat-cswin-base_8xb256-amp-coslr-100e_'
          'in1k-192px.py'] = simmim('cswin')
    table['boat_upernet_ade20k.py'] = upernet('cswin', 'tiny', 0.3)
    table['demo/boat-cswin-tiny_upernet_demo.py'] = seg_demo()
    table['demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py'] = det_demo()
    for recipe in table.values():
        # No layer-wise lr decay or other optimizer constructor anywhere
        # but in the fine-tuning of SimMIM models.
        recipe['optim_wrapper.constructor'] = ABSENT
    for (family, size), path in FINE_TUNED.items():
        table[path] = simmim_fine_tuning(family, size)
    return table


RECIPES = _recipes()


def test_every_config_has_a_recipe():
    import glob
    shipped = {
        osp.relpath(p, osp.join(ROOT, 'configs'))
        for p in glob.glob(
            osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
        if '_base_' not in p
    }
    assert shipped == set(RECIPES)


@pytest.mark.parametrize('path', sorted(RECIPES))
def test_config_follows_its_recipe(path):
    cfg = _cfg(path)
    wrong = []
    for key, want in RECIPES[path].items():
        if key == 'gpus x batch':
            # The name's GxbB is the recipe's batch, B per GPU.
            gpus, batch = want
            match = re.search(r'_(\d+)xb(\d+)[-_]', osp.basename(path))
            if match:
                assert (int(match[1]), int(match[2])) == want, path
            got = _get(cfg, 'train_dataloader.batch_size')
            if got != batch:
                wrong.append(f'train_dataloader.batch_size: {got!r} != '
                             f'{batch!r} ({gpus} GPUs x {batch})')
            continue
        got = _get(cfg, key)
        if not _same(got, want):
            wrong.append(f'{key}: {_plain(got)!r} != {_plain(want)!r}')
    assert not wrong, '\n'.join([path] + wrong)


# Each mmdet Swin config of the installed mmdet and a BOAT config that
# follows it (the small ones: mmdet's Swin-S 3x is the AMP variant of its
# Swin-T 3x, whose optimizer wrapper the BOAT configs keep).
MMDET_SWIN = {
    'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py':
    'boat_swin/mask-rcnn_boat-swin-tiny_fpn_1x_coco.py',
    'mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py':
    'boat_cswin/mask-rcnn_boat-cswin-tiny_fpn_ms-crop-3x_coco.py',
    'mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py':
    'boat_swin/mask-rcnn_boat-swin-small_fpn_ms-crop-3x_coco.py',
    'retinanet_swin-t-p4-w7_fpn_1x_coco.py':
    'boat_cswin/retinanet_boat-cswin-small_fpn_1x_coco.py',
}


def _unscoped(value: Any) -> Any:
    """A plain config value without the ``_scope_`` keys that inheriting
    from ``mmdet::`` bases adds."""
    value = _plain(value)
    if isinstance(value, dict):
        return {k: _unscoped(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, list):
        return [_unscoped(v) for v in value]
    return value


@pytest.mark.parametrize('upstream', sorted(MMDET_SWIN))
def test_detection_recipe_is_mmdets(upstream):
    """The training recipe and the detector around the backbone are those
    of the installed mmdet's Swin config, read from mmdet itself."""
    import mmdet
    theirs = Config.fromfile(
        osp.join(
            osp.dirname(mmdet.__file__), '.mim', 'configs', 'swin', upstream))
    ours = _cfg(MMDET_SWIN[upstream])
    if 'amp' in upstream:
        theirs.optim_wrapper.type = 'OptimWrapper'
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'auto_scale_lr', 'train_dataloader.dataset.pipeline',
                'train_dataloader.batch_size',
                'test_dataloader.dataset.pipeline',
                'model.backbone.drop_path_rate', 'model.backbone.out_indices'):
        assert _unscoped(_get(ours, key)) == _unscoped(_get(theirs, key)), key
    for model in (ours.model, theirs.model):
        model.pop('backbone')
        model.neck.pop('in_channels')  # the widths of the backbone
    assert _unscoped(ours.model) == _unscoped(theirs.model)


# ---------------------------------------------------------------------------
# Built models: widths and weight decay per parameter.
# ---------------------------------------------------------------------------

# One model of each family and task (the tiny ones) and the demos.
BUILT = [
    'boat_swin/boat-swin-tiny_16xb64_in1k.py',
    'boat_cswin/boat-cswin-tiny_8xb256_in1k.py',
    'boat_swin/boat-swin-tiny_upernet_8xb2-160k_ade20k-512x512.py',
    'boat_cswin/boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py',
    'boat_swin/mask-rcnn_boat-swin-tiny_fpn_1x_coco.py',
    'boat_cswin/mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py',
    'boat_swin/retinanet_boat-swin-tiny_fpn_1x_coco.py',
    'boat_cswin/retinanet_boat-cswin-tiny_fpn_1x_coco.py',
    'demo/boat-cswin-tiny_upernet_demo.py',
    'demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py',
]


def _build(path: str):
    cfg = _cfg(path)
    scope = cfg.default_scope
    init_default_scope(scope)
    models = importlib.import_module(f'{scope}.registry').MODELS
    if scope != 'mmpretrain':
        cfg.model.backbone.init_cfg = None  # no converted weights here
    if scope == 'mmseg':
        # SyncBN needs a process group; BN has the same widths.
        for head in ('decode_head', 'auxiliary_head'):
            cfg.model[head].norm_cfg = dict(type='BN', requires_grad=True)
    torch.manual_seed(0)
    return cfg, models.build(cfg.model).eval()


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_simmim_recipe_is_mmpretrains(family):
    """The SimMIM configs are mmpretrain's Swin-B SimMIM config, key for
    key, but for the backbone, the decoder's input width and a seed per
    process."""
    ours = _cfg(f'boat_{family}/simmim_boat-{family}-base'
                f'{"-w6" if family == "swin" else ""}_8xb256-amp-coslr-'
                '100e_in1k-192px.py')
    import mmpretrain
    theirs = Config.fromfile(
        osp.join(
            osp.dirname(mmpretrain.__file__), '.mim', 'configs', 'simmim',
            'simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px.py'))
    assert set(ours.keys()) - {'custom_imports'} == set(theirs.keys())
    for key in theirs.keys():
        if key not in ('model', 'randomness'):
            assert _unscoped(ours[key]) == _unscoped(theirs[key]), key
    assert ours.randomness == dict(theirs.randomness, diff_rank_seed=True)
    for key in theirs.model.keys():
        if key not in ('backbone', 'neck'):
            assert _unscoped(ours.model[key]) == _unscoped(
                theirs.model[key]), key
    assert dict(
        ours.model.neck, in_channels=0) == dict(
            theirs.model.neck, in_channels=0)


@pytest.mark.parametrize('family, size', sorted(FINE_TUNED))
def test_simmim_fine_tuning_recipe_is_mmpretrains(family, size):
    """The configs that fine-tune a SimMIM model are mmpretrain's SimMIM
    Swin-B fine-tuning config of the same size, key for key, but for the
    backbone (and the checkpoint it starts from), the head's input width,
    a seed per process and the total batch for --auto-scale-lr."""
    ours = _cfg(FINE_TUNED[family, size])
    import mmpretrain
    theirs = Config.fromfile(
        osp.join(
            osp.dirname(mmpretrain.__file__), '.mim', 'configs', 'simmim',
            'benchmarks', 'swin-base-w6_8xb256-coslr-100e_in1k-192px.py'
            if size == 192 else 'swin-base-w7_8xb256-coslr-100e_in1k.py'))
    assert set(ours.keys()) - {'custom_imports', 'auto_scale_lr'} == set(
        theirs.keys())
    for key in theirs.keys():
        if key not in ('model', 'randomness'):
            assert _unscoped(ours[key]) == _unscoped(theirs[key]), key
    assert ours.randomness == dict(theirs.randomness, diff_rank_seed=True)
    for key in theirs.model.keys():
        if key not in ('backbone', 'head'):
            assert _unscoped(ours.model[key]) == _unscoped(
                theirs.model[key]), key
    assert dict(
        ours.model.head, in_channels=0) == dict(
            theirs.model.head, in_channels=0)


@pytest.fixture(scope='module')
def built():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = _build(path)
        return cache[path]

    return get


@pytest.mark.parametrize('path', BUILT)
def test_heads_take_the_backbone_widths(path, built):
    """A forward of the full model at 64x64: every head and neck consumes
    the features the backbone really outputs."""
    cfg, model = built(path)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        feats = model.backbone(x)
        widths = [f.shape[1] for f in feats]
        out_indices = list(cfg.model.backbone.out_indices)
        # The real widths are the arch widths the tables use for the
        # models not built here.
        arch = cfg.model.backbone.arch
        if isinstance(arch, str):
            table = (SWIN_WIDTHS if cfg.model.backbone.type == 'BOATSwin' else
                     CSWIN_WIDTHS)[arch]
        else:  # a demo's own arch dict: mmpretrain's int embed_dims rule
            table = [arch['embed_dims'] * 2**i for i in range(4)]
        assert widths == [table[i] for i in out_indices]
        if cfg.default_scope == 'mmpretrain':
            assert cfg.model.head.in_channels == widths[-1]
            scores = model(x)
            assert scores.shape == (1, cfg.model.head.num_classes)
        elif cfg.default_scope == 'mmseg':
            assert list(cfg.model.decode_head.in_channels) == widths
            seg = model.decode_head(feats)
            assert seg.shape[:2] == (1, cfg.model.decode_head.num_classes)
            aux = model.auxiliary_head(feats)
            assert aux.shape[:2] == (1, cfg.model.auxiliary_head.num_classes)
            assert cfg.model.auxiliary_head.in_channels == widths[
                cfg.model.auxiliary_head.in_index]
        else:
            from mmdet.structures import DetDataSample
            assert list(cfg.model.neck.in_channels) == widths
            sample = DetDataSample(
                metainfo=dict(
                    img_shape=(64, 64),
                    ori_shape=(64, 64),
                    pad_shape=(64, 64),
                    batch_input_shape=(64, 64),
                    scale_factor=(1., 1.)))
            outs = model(x, [sample], mode='tensor')
            flat = [t for t in _tensors(outs)]
            assert flat and all(torch.isfinite(t).all() for t in flat)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _expected_decay(model: nn.Module,
                    scope: str,
                    base: float,
                    exempt: bool = True) -> Dict:
    """Weight decay of every parameter by the recipe's rule.

    ImageNet (Swin's ``set_weight_decay``, timm's ``filter_bias_and_bn``):
    none on 1-D weights, biases and position tables. Segmentation and
    Mask R-CNN (mmseg / mmdet Swin): none on the LayerNorms and position
    tables; BN layers and biases of the heads decay. ``exempt=False``
    (mmdet's Swin RetinaNet, plain SGD): every parameter decays.
    """
    norms = {
        f'{name}.{p}'
        for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
        for p, _ in m.named_parameters()
    }
    want = {}
    for name, p in model.named_parameters():
        table = name.endswith(
            ('relative_position_bias_table', 'absolute_pos_embed'))
        if not exempt:
            no_decay = False
        elif scope == 'mmpretrain':
            no_decay = p.dim() == 1 or name.endswith('.bias') or table
        else:
            no_decay = name in norms or table
        want[name] = 0. if no_decay else base
    return want


@pytest.mark.parametrize('path', BUILT[:8])
def test_weight_decay_of_every_parameter(path, built):
    cfg, model = built(path)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    got = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            got[id(p)] = group['weight_decay']
    base = cfg.optim_wrapper.optimizer.weight_decay
    exempt = 'retinanet' not in path  # mmdet's Swin RetinaNet: none
    want = _expected_decay(model, cfg.default_scope, base, exempt)
    names = dict(model.named_parameters())
    wrong = [
        f'{name}: {got[id(p)]} != {want[name]}' for name, p in names.items()
        if not math.isclose(got[id(p)], want[name])
    ]
    assert not wrong, '\n'.join(wrong[:20])
    # The rule is not vacuous: both kinds exist, position tables included.
    assert (0. in want.values()) == exempt and base in want.values()
    if 'swin' in path and 'cswin' not in path:
        assert any(n.endswith('relative_position_bias_table') for n in names)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_layer_wise_lr_decay_of_the_fine_tuning(family):
    """mmpretrain's ``LearningRateDecayOptimWrapperConstructor`` on the
    BOAT-B classifier of a SimMIM fine-tuning config: the head has the
    base lr, every block one lr (its FSLA included), 0.9 times that of the
    block after it, the stem 0.9 ** (blocks + 1); the weight decay is the
    ImageNet rule (none on 1-D weights, biases, position tables)."""
    cfg = _cfg(FINE_TUNED[family, 192])
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    model = MODELS.build(cfg.model)  # not initialised: no checkpoint here
    cfg.optim_wrapper.type = 'OptimWrapper'  # AMP needs a GPU
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr, decay = {}, {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            lr[id(p)], decay[id(p)] = group['lr'], group['weight_decay']
    names = dict(model.named_parameters())
    lr = {name: lr[id(p)] for name, p in names.items()}
    base = cfg.optim_wrapper.optimizer.lr
    want = _expected_decay(model, 'mmpretrain', 0.05)
    assert {n: decay[id(p)] for n, p in names.items()} == want
    # Blocks in forward order, each with the lrs of its parameters.
    blocks = {}
    for name, value in lr.items():
        m = re.match(r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.', name)
        if m:
            blocks.setdefault((int(m[1]), int(m[2])), set()).add(value)
    assert all(len(v) == 1 for v in blocks.values()), blocks
    order = [blocks[k].pop() for k in sorted(blocks)]
    assert len(order) == sum(model.backbone.depths) > 20
    for before, after in zip(order, order[1:]):
        assert math.isclose(before, 0.9 * after)
    assert any('.fsla.' in n for n in lr)
    heads = [v for n, v in lr.items() if n.startswith('head.')]
    assert heads and all(math.isclose(v, base) for v in heads)
    assert math.isclose(order[-1], base * 0.9)  # the output norms between
    stem = [v for n, v in lr.items() if n.startswith('backbone.patch_embed')]
    assert stem and all(
        math.isclose(v, base * 0.9**(len(order) + 1)) for v in stem)
