# BOAT-CSWin-T + UPerNet on ADE20K: 512x512 crops, 160k iterations, 8 GPUs
# x 2 images (total batch 16); the recipe of the CSWin/BOAT segmentation
# code.
_base_ = [
    '../_base_/models/upernet_boat-cswin.py',
    'mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
# ImageNet-1K weights converted from the published checkpoint with
#   python tools/model_converters/boat2mm.py SRC.pth \
#       checkpoints/boat-cswin-tiny_in1k.pth
# (relative to the working directory). Point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# or train from scratch with --cfg-options model.backbone.init_cfg=None
checkpoint_file = 'checkpoints/boat-cswin-tiny_in1k.pth'
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.3,
        init_cfg=dict(
            type='Pretrained', checkpoint=checkpoint_file,
            prefix='backbone.')),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))

# AdamW, lr 6e-5, weight decay 0.01, none on norms and position tables.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
# 1500 iterations of linear warm-up, then poly (power 1) decay to 0.
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False)
]
# 8 GPUs x 2 images = total batch 16 (see --auto-scale-lr for other sizes).
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
