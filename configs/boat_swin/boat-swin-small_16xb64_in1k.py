# BOAT-Swin-S: the BOAT-Swin-T recipe with drop path 0.3.
_base_ = ['./boat-swin-tiny_16xb64_in1k.py']
model = dict(backbone=dict(arch='small', drop_path_rate=0.3))
