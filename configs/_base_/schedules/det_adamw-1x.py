# The detection recipe of mmdet's Swin Mask R-CNN configs, shared by the BOAT
# Mask R-CNN configs: mmdet's 1x schedule (12 epochs, steps after 8 and 11,
# total batch 16) with AdamW (lr 1e-4, weight decay 0.05, none on norms and
# position tables) and 1000 iterations of linear warm-up.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py']

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }),
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=0.0001,
        betas=(0.9, 0.999),
        weight_decay=0.05))
