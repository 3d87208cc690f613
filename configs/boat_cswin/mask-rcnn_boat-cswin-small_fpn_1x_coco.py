# BOAT-CSWin-S + Mask R-CNN: the tiny recipe with this arch and drop path 0.3.
_base_ = ['./mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/boat-cswin-small_in1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=checkpoint_file)))
