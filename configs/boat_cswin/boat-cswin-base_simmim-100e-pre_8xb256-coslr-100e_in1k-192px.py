# BOAT-CSWin-B fine-tuned on ImageNet-1K at 192 px from its SimMIM
# pre-training (simmim_boat-cswin-base_8xb256-amp-coslr-100e_in1k-192px.py,
# run first): mmpretrain's SimMIM Swin-B fine-tuning recipe with the
# backbone swapped.
_base_ = ['../_base_/simmim-ft_in1k-192px.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATCSWin',
        arch='base',
        out_indices=(3, ),
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='work_dirs/simmim_boat-cswin-base_8xb256-amp-coslr-'
            '100e_in1k-192px/epoch_100.pth',
            prefix='backbone.')),
    # BOAT-CSWin-B's last stage is 768 wide.
    head=dict(in_channels=768))
