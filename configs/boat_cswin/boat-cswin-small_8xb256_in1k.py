# BOAT-CSWin-S: the BOAT-CSWin-T recipe with drop path 0.4.
_base_ = ['./boat-cswin-tiny_8xb256_in1k.py']
model = dict(backbone=dict(arch='small', drop_path_rate=0.4))
