# CPU-sized demo of the headline config (configs/boat_upernet_ade20k.py) on
# the generated ADE20K-like data; `make demo` (tools/run_demo.py) generates
# the data, trains, tests and draws the predictions in 5 to 7 minutes on two
# CPU cores. Changes to the headline config, all for the CPU budget:
# 128x128 crops, a BOAT-CSWin of reduced width and depth (same block design:
# CSWin stripes + FSLA in every even block), narrower UPerNet/FCN heads with
# BN instead of SyncBN, only the 8 classes the generator draws (a 150-way
# output would spend half of each step on empty logits), no photometric
# distortion (colour is what tells the generated textures apart), no
# ImageNet init, AdamW with a short schedule.
_base_ = ['../boat_upernet_ade20k.py']

# Written by tools/dataset_converters/gen_synthetic_data.py (ade20k).
data_root = 'data/ade_synthetic/ADEChallengeData2016'
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
# The first 8 ADE20K classes (ids 1..8), the ones
# gen_synthetic_data.py ade20k draws by default.
num_classes = 8
metainfo = dict(
    classes=('wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road',
             'bed '),
    palette=[[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50],
             [4, 200, 3], [120, 120, 80], [140, 140, 140], [204, 5, 255]])
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(
            _delete_=True,  # a dict replacing the base's 'tiny'
            embed_dims=32,
            depths=[1, 2, 4, 1],
            num_heads=[2, 4, 8, 16],
            split_sizes=[1, 2, 7, 7]),
        drop_path_rate=0.1,
        init_cfg=None),
    decode_head=dict(
        in_channels=[32, 64, 128, 256],
        channels=64,
        num_classes=num_classes,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=128,
        channels=32,
        num_classes=num_classes,
        norm_cfg=norm_cfg))

# The ADE20K pipelines at a quarter of the scale (images are 128x128).
# LoadAnnotations takes reduce_zero_label from ADE20KDataset (True);
# passing it again only makes mmseg warn that the argument is deprecated.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=(512, 128),
        ratio_range=(0.75, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
# Loading in the main process: 128x128 images decode in a millisecond, and
# worker processes would take cores from the two training threads (each
# stall of a descheduled thread costs a scheduler tick).
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

# From scratch: a larger learning rate than fine-tuning's 6e-5, for the
# total batch of one process of 4 images (--auto-scale-lr scales from it).
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.01))
auto_scale_lr = dict(enable=False, base_batch_size=4)
max_iters = 2000
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=200),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=200,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(
        type='CheckpointHook',
        by_epoch=False,
        interval=max_iters,
        max_keep_ckpts=1))
randomness = dict(seed=0)
