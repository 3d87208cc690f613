# BOAT-CSWin-T + Mask R-CNN (FPN) on COCO: 3x schedule (36 epochs) with
# mmdet's multi-scale + crop training of its Swin 3x configs (shorter side
# 480-800), 8 GPUs x 2 images; otherwise as the 1x config.
_base_ = [
    '../_base_/models/mask-rcnn_boat-cswin_fpn.py',
    '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/det_adamw-3x.py', 'mmdet::_base_/default_runtime.py'
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
