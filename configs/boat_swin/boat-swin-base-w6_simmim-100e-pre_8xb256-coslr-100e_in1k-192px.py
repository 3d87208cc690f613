# BOAT-Swin-B fine-tuned on ImageNet-1K at 192 px (windows of 6) from its
# SimMIM pre-training (simmim_boat-swin-base-w6_8xb256-amp-coslr-100e_in1k-
# 192px.py, run first): mmpretrain's SimMIM Swin-B fine-tuning recipe with
# the backbone swapped.
_base_ = ['../_base_/simmim-ft_in1k-192px.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATSwin',
        arch='base',
        window_size=6,
        out_indices=(3, ),
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='work_dirs/simmim_boat-swin-base-w6_8xb256-amp-coslr-'
            '100e_in1k-192px/epoch_100.pth',
            prefix='backbone.')),
    head=dict(in_channels=1024))
