# BOAT-CSWin-B, total batch 1024 (8 x 128): AdamW 1e-3, wd 0.1, EMA 0.99992,
# drop path 0.5; otherwise the BOAT-CSWin-T recipe.
_base_ = ['./boat-cswin-tiny_8xb256_in1k.py']
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=768))
train_dataloader = dict(batch_size=128)
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.1))
# Warm-up from 1e-6 as for tiny: 1e-6 / 1e-3.
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=20,
        convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20)
]
# EMA decay 0.99992: momentum 1 - 0.99992.
custom_hooks = [dict(type='EMAHook', momentum=8e-5, priority='ABOVE_NORMAL')]
auto_scale_lr = dict(base_batch_size=1024)
