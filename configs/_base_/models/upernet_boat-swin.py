# BOAT-Swin + UPerNet (+ FCN auxiliary head), on top of mmseg's UPerNet
# base (Swin flavour: same heads, data preprocessor, SyncBN in the heads).
_base_ = ['mmseg::_base_/models/upernet_swin.py']
# Registers BOATSwin/BOATCSWin; also lets upstream tools run this config.
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(
        _delete_=True,  # drop the SwinTransformer arguments of the base
        type='BOATSwin',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        with_fsla=True,
        fsla_cfg=dict(group_size=49, overlap=20),
        norm_cfg=dict(type='LN', requires_grad=True),
        with_cp=False),
    # BOAT-Swin-T widths: 96, 192, 384, 768. The heads get norm_cfg
    # explicitly: a child config's top-level `norm_cfg` would not reach
    # them once merged.
    decode_head=dict(
        in_channels=[96, 192, 384, 768], num_classes=150, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=384, num_classes=150, norm_cfg=norm_cfg))
