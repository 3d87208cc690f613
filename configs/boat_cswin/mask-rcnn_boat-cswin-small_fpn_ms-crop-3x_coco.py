# BOAT-CSWin-S + Mask R-CNN: the tiny recipe with this arch; drop path stays
# 0.2, as in mmdet's Swin-S Mask R-CNN (which takes its Swin-T config's).
_base_ = ['./mask-rcnn_boat-cswin-tiny_fpn_ms-crop-3x_coco.py']
checkpoint_file = 'checkpoints/boat-cswin-small_in1k.pth'
model = dict(
    backbone=dict(arch='small', init_cfg=dict(checkpoint=checkpoint_file)))
