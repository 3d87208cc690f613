# SimMIM pre-training of BOAT-CSWin-B on ImageNet-1K at 192 px:
# mmpretrain's recipe for Swin-B with the backbone swapped. The
# boat-cswin-base_simmim-100e-pre_*.py configs fine-tune the result.
_base_ = ['../_base_/simmim_in1k-192px.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='SimMIMBOATCSWin',
        arch='base',
        out_indices=(3, ),
        drop_path_rate=0.1),
    # BOAT-CSWin-B's last stage is 768 wide; its stride is 32 as Swin's.
    neck=dict(in_channels=768, encoder_stride=32))
