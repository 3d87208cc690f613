# BOAT-Swin-Tiny, ImageNet-1K 224, 300 epochs, total batch 1024 (16 x 64):
# AdamW 1e-3, wd 0.05, 20 warm-up epochs, cosine to 1e-5, grad clip 5,
# RandAugment m9-mstd0.5, mixup 0.8 / cutmix 1.0, label smoothing 0.1,
# random erasing 0.25, no weight decay on norms, biases and position tables.
_base_ = [
    '../_base_/models/boat-swin_in1k.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    '../_base_/cls_runtime.py'
]
model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.2), head=dict(in_channels=768))
optim_wrapper = dict(clip_grad=dict(max_norm=5.0))
