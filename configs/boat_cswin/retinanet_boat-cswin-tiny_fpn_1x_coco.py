# BOAT-CSWin-T + RetinaNet (FPN on stages 1-3, P3-P7) on COCO: the recipe of
# mmdet's Swin RetinaNet (retinanet_swin-t-p4-w7_fpn_1x_coco.py): mmdet's 1x
# schedule (SGD, momentum 0.9, weight decay 1e-4, 500 warm-up iterations,
# steps after epochs 8 and 11) at lr 0.01, single scale 1333x800, 8 GPUs x
# 2 images, drop path 0.2.
_base_ = [
    '../_base_/models/retinanet_boat-cswin_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py'
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
optim_wrapper = dict(optimizer=dict(lr=0.01))
