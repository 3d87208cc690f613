# BOAT-Swin-T + Mask R-CNN (FPN) on COCO: 1x schedule (12 epochs), single
# scale 1333x800, 8 GPUs x 2 images (total batch 16); the recipe of mmdet's
# Swin configs (AdamW 1e-4, weight decay 0.05 but none on norms and
# position tables, drop path 0.2).
_base_ = [
    '../_base_/models/mask-rcnn_boat-swin_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '../_base_/schedules/det_adamw-1x.py', 'mmdet::_base_/default_runtime.py'
]
# ImageNet-1K weights converted from the published checkpoint with
#   python tools/model_converters/boat2mm.py SRC.pth \
#       checkpoints/boat-swin-tiny_in1k.pth
# (relative to the working directory). Point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# or train from scratch with --cfg-options model.backbone.init_cfg=None
checkpoint_file = 'checkpoints/boat-swin-tiny_in1k.pth'
model = dict(
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.2,
        init_cfg=dict(
            type='Pretrained', checkpoint=checkpoint_file,
            prefix='backbone.')))
