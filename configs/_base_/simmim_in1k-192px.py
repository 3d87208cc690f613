# mmpretrain's SimMIM recipe for Swin-B (ImageNet-1K at 192 px, 100 epochs,
# batch 8 x 256, AdamW, AMP), for the BOAT SimMIM configs, which swap the
# backbone and give the decoder its width.
_base_ = [
    'mmpretrain::simmim/simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px.py'  # noqa: E501
]
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)
# Restated without the `_scope_` key that an `mmpretrain::` base adds to
# every dict with a type: MMEngine calls the collate function with it.
train_dataloader = dict(collate_fn=dict(_delete_=True, type='default_collate'))
# Every process its own seed (seed + rank), as the public SimMIM and BOAT
# training code seed them, and as cls_runtime.py does for the classifiers.
randomness = dict(seed=None, deterministic=False, diff_rank_seed=True)
