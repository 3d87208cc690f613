# mmpretrain's default runtime, for boat-mm's classifier configs. Its
# visualizer is restated without the `_scope_` key that an `mmpretrain::`
# base adds: mmpretrain's browse_dataset.py passes this dict's items to
# UniversalVisualizer itself, which takes no `_scope_`.
_base_ = ['mmpretrain::_base_/default_runtime.py']
visualizer = dict(
    _delete_=True,
    type='UniversalVisualizer',
    vis_backends=[dict(type='LocalVisBackend')])
