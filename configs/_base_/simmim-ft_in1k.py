# mmpretrain's recipe for fine-tuning its SimMIM Swin-B on ImageNet-1K at
# 224 px (100 epochs, batch 8 x 256, AdamW 5e-3 with layer-wise lr decay
# 0.9, AMP), for the BOAT configs that fine-tune their SimMIM pre-training;
# they swap the backbone (and its init_cfg) and give the head its width.
_base_ = [
    'mmpretrain::simmim/benchmarks/swin-base-w7_8xb256-coslr-100e_in1k.py'  # noqa: E501
]
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)
# Restated without the `_scope_` key that an `mmpretrain::` base adds to
# every dict with a type: MMEngine calls the collate function with it, and
# mmpretrain's browse_dataset.py the visualizer.
train_dataloader = dict(collate_fn=dict(_delete_=True, type='default_collate'))
val_dataloader = dict(collate_fn=dict(_delete_=True, type='default_collate'))
test_dataloader = val_dataloader
visualizer = dict(
    _delete_=True,
    type='UniversalVisualizer',
    vis_backends=[dict(type='LocalVisBackend')])
# The recipe's total batch, for --auto-scale-lr (mmpretrain leaves it out).
auto_scale_lr = dict(base_batch_size=2048)
# Every process its own seed (seed + rank), as cls_runtime.py.
randomness = dict(seed=0, deterministic=False, diff_rank_seed=True)
