# The headline model: BOAT-CSWin-T + UPerNet on ADE20K (50.5 mIoU in the
# BOAT paper), 512x512 crops, 160k iterations, total batch 16.
#   python tools/train.py configs/boat_upernet_ade20k.py
# needs ADE20K in data/ade/ADEChallengeData2016 and the converted ImageNet
# weights in checkpoints/boat-cswin-tiny_in1k.pth (see the base config);
# `make demo` runs a CPU-sized version on generated data.
_base_ = ['./boat_cswin/boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py']
