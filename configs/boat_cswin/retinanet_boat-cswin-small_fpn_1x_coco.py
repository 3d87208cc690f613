# BOAT-CSWin-S + RetinaNet: the tiny recipe with this arch; drop path stays
# 0.2 (mmdet has no Swin-S RetinaNet; its Swin-S Mask R-CNN keeps 0.2).
_base_ = ['./retinanet_boat-cswin-tiny_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/boat-cswin-small_in1k.pth'
model = dict(
    backbone=dict(arch='small', init_cfg=dict(checkpoint=checkpoint_file)))
