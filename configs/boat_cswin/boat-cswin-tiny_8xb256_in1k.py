# BOAT-CSWin-Tiny, ImageNet-1K 224, 300 epochs, total batch 2048:
# AdamW 2e-3, wd 0.05, 20 warm-up epochs from 1e-6, cosine to 1e-5, EMA
# 0.99984, RandAugment m9-mstd0.5, mixup 0.8 / cutmix 1.0, label smoothing
# 0.1, random erasing 0.25; test: bicubic resize to 248, center crop 224
# (ratio 0.9).
_base_ = [
    '../_base_/models/boat-cswin_in1k.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    '../_base_/cls_runtime.py'
]
model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.2), head=dict(in_channels=512))
train_dataloader = dict(batch_size=256)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='ResizeEdge',
        scale=248,
        edge='short',
        backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.05))
# timm's warm-up starts at --warmup-lr 1e-6 whatever the lr: 1e-6 / 2e-3.
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=5e-4,
        by_epoch=True,
        end=20,
        convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20)
]
# mmengine's EMA momentum is 1 - decay, applied every iteration: 1 - 0.99984
# (written out, as `1 - 0.99984` is 0.000160000000000049 in the logs).
custom_hooks = [dict(type='EMAHook', momentum=1.6e-4, priority='ABOVE_NORMAL')]
auto_scale_lr = dict(base_batch_size=2048)
