# The UPerNet fine-tuning recipe of the BOAT (and CSWin) segmentation code,
# shared by every BOAT UPerNet config: mmseg's 160k-iteration schedule with
# AdamW instead of SGD, linear warm-up then poly decay, total batch 16.
_base_ = ['mmseg::_base_/schedules/schedule_160k.py']

# AdamW, lr 6e-5, weight decay 0.01, none on norms and position tables.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
# 1500 iterations of linear warm-up, then poly (power 1) decay to 0.
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False)
]
# 8 GPUs x 2 images = total batch 16 (see --auto-scale-lr for other sizes);
# the batch sizes themselves are set next to the dataset in each config.
auto_scale_lr = dict(enable=False, base_batch_size=16)
