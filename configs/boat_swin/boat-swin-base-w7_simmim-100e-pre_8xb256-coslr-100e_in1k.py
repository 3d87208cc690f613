# BOAT-Swin-B fine-tuned on ImageNet-1K at 224 px (windows of 7) from its
# SimMIM pre-training at 192 px (simmim_boat-swin-base-w6_8xb256-amp-coslr-
# 100e_in1k-192px.py, run first; its position-bias tables of windows of 6
# are resized on load): mmpretrain's SimMIM Swin-B fine-tuning recipe at
# 224 with the backbone swapped.
_base_ = ['../_base_/simmim-ft_in1k.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='BOATSwin',
        arch='base',
        window_size=7,
        out_indices=(3, ),
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='work_dirs/simmim_boat-swin-base-w6_8xb256-amp-coslr-'
            '100e_in1k-192px/epoch_100.pth',
            prefix='backbone.')),
    head=dict(in_channels=1024))
