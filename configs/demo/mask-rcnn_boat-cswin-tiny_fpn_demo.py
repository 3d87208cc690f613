# CPU-sized demo of configs/boat_cswin/mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py
# on the generated COCO-like data (`python tools/dataset_converters/
# gen_synthetic_data.py coco data/coco_synthetic`: 200 + 50 scenes of
# 160x160, 6 categories). Changes, all for the CPU budget: images at their
# own 160x160 size, the segmentation demo's BOAT-CSWin of reduced width
# and depth (same block design), 64-channel FPN and heads (32 in the mask
# convs), 16-pixel anchors at the finest level (the objects are 20-60
# pixels), fewer proposals and sampled RoIs, only the 6 categories the
# generator draws, no ImageNet init, AdamW 1e-3 for 800 iterations of batch 2.
_base_ = ['../boat_cswin/mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py']

# Written by tools/dataset_converters/gen_synthetic_data.py (coco).
data_root = 'data/coco_synthetic/'
# The first 6 COCO categories (ids 1-6), the ones the generator draws by
# default: 3 texture classes, the look-alike pair, the marker.
num_classes = 6
metainfo = dict(
    classes=('person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus'))
img_scale = (160, 160)
channels = 64
model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True,  # a dict replacing the base's 'tiny'
            embed_dims=32,
            depths=[1, 2, 4, 1],
            num_heads=[2, 4, 8, 16],
            split_sizes=[1, 2, 7, 7]),
        drop_path_rate=0.1,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=channels),
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(
            in_channels=channels, fc_out_channels=256,
            num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(
            in_channels=channels,
            conv_out_channels=32,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=600, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300), rcnn=dict(max_per_img=50)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
# Loading in the main process (small images; see the segmentation demo).
train_dataloader = dict(
    batch_size=2,
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
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# From scratch: a larger learning rate than fine-tuning's 1e-4, for the
# total batch of one process of 2 images (--auto-scale-lr scales from it).
optim_wrapper = dict(optimizer=dict(lr=1e-3))
auto_scale_lr = dict(enable=False, base_batch_size=2)
max_iters = 800
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[600, 740],
        gamma=0.1)
]
train_cfg = dict(
    _delete_=True,
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(
        type='CheckpointHook',
        by_epoch=False,
        interval=max_iters,
        max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
