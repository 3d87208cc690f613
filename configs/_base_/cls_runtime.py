# mmpretrain's default runtime, for boat-mm's classifier configs. Its
# visualizer is restated without the `_scope_` key that an `mmpretrain::`
# base adds: mmpretrain's browse_dataset.py passes this dict's items to
# UniversalVisualizer itself, which takes no `_scope_`.
_base_ = ['mmpretrain::_base_/default_runtime.py']
visualizer = dict(
    _delete_=True,
    type='UniversalVisualizer',
    vis_backends=[dict(type='LocalVisBackend')])
# Every process its own seed (seed + rank), as the public BOAT training
# code seeds them (BOAT-Swin/main.py, BOAT-CSWin/main.py); with one seed,
# the GPUs of a run draw the same drop-path masks and the same mixup /
# cutmix (lambda, box, which of the two) at every step. MMEngine keeps the
# sampler's seed common, so the data split is unchanged.
randomness = dict(seed=None, deterministic=False, diff_rank_seed=True)
