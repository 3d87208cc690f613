# SimMIM pre-training of BOAT-Swin-B on ImageNet-1K at 192 px (windows of
# 6): mmpretrain's recipe for Swin-B with the backbone swapped. The
# boat-swin-base-w{6,7}_simmim-100e-pre_*.py configs fine-tune the result.
_base_ = ['../_base_/simmim_in1k-192px.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='SimMIMBOATSwin',
        arch='base',
        window_size=6,
        out_indices=(3, ),
        drop_path_rate=0.1),
    # The last stage is 1024 wide, as Swin-B's; the stride 32.
    neck=dict(in_channels=1024, encoder_stride=32))
