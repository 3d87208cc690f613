# BOAT-Swin-Small + UPerNet: the tiny recipe with this arch's widths and
# drop path.
_base_ = ['./boat-swin-tiny_upernet_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/boat-swin-small_in1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
