# BOAT-Swin + Mask R-CNN with FPN, on top of mmdet's Mask R-CNN base
# (ResNet-50 there): the backbone swapped, the FPN fed its four stages.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']
# Registers BOATSwin/BOATCSWin; also lets upstream tools run this config.
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # drop the ResNet arguments of the base
        type='BOATSwin',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        with_fsla=True,
        fsla_cfg=dict(group_size=49, overlap=20),
        norm_cfg=dict(type='LN', requires_grad=True),
        with_cp=False),
    # BOAT-Swin-T/S widths: 96, 192, 384, 768.
    neck=dict(in_channels=[96, 192, 384, 768]))
