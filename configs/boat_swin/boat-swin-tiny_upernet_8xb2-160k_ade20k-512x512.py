# BOAT-Swin-T + UPerNet on ADE20K: 512x512 crops, 160k iterations, 8 GPUs
# x 2 images (total batch 16); the recipe of the CSWin/BOAT segmentation
# code.
_base_ = [
    '../_base_/models/upernet_boat-swin.py',
    'mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/upernet_adamw-160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
# ImageNet-1K weights converted from the published checkpoint with
#   python tools/model_converters/boat2mm.py SRC.pth \
#       checkpoints/boat-swin-tiny_in1k.pth
# (relative to the working directory). Point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# or train from scratch with --cfg-options model.backbone.init_cfg=None
checkpoint_file = 'checkpoints/boat-swin-tiny_in1k.pth'
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.3,
        init_cfg=dict(
            type='Pretrained', checkpoint=checkpoint_file,
            prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

# 8 GPUs x 2 images = total batch 16 (the schedule's auto_scale_lr base).
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
