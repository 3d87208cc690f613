# BOAT-CSWin + RetinaNet with FPN, on top of mmdet's RetinaNet base: as in
# mmdet's Swin RetinaNet, the FPN takes stages 1-3 (strides 8-32) and adds
# two levels (P6, P7) on top; stage 0 is not output (unused parameters).
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py']
# Registers BOATCSWin/BOATSwin; also lets upstream tools run this config.
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # drop the ResNet arguments of the base
        type='BOATCSWin',
        arch='tiny',
        out_indices=(1, 2, 3),
        drop_path_rate=0.2,
        with_fsla=True,
        fsla_cfg=dict(group_size=49, overlap=20),
        norm_cfg=dict(type='LN', requires_grad=True),
        with_cp=False),
    neck=dict(in_channels=[128, 256, 512], start_level=0, num_outs=5))
