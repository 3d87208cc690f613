# BOAT-CSWin-T + RetinaNet (FPN on stages 1-3, P3-P7) on COCO: 1x schedule,
# single scale 1333x800, 8 GPUs x 2 images; the AdamW recipe of mmdet's
# Swin Mask R-CNN configs (see ../_base_/schedules/det_adamw-1x.py).
_base_ = [
    '../_base_/models/retinanet_boat-cswin_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    '../_base_/schedules/det_adamw-1x.py', 'mmdet::_base_/default_runtime.py'
]
# ImageNet-1K weights converted from the published checkpoint with
#   python tools/model_converters/boat2mm.py SRC.pth \
#       checkpoints/boat-cswin-tiny_in1k.pth
# (relative to the working directory). Point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# or train from scratch with --cfg-options model.backbone.init_cfg=None
checkpoint_file = 'checkpoints/boat-cswin-tiny_in1k.pth'
model = dict(
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.2,
        init_cfg=dict(
            type='Pretrained', checkpoint=checkpoint_file,
            prefix='backbone.')))
