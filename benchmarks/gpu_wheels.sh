#!/usr/bin/env bash
# Copyright (c) boat-mm contributors. All rights reserved.
#
# Wheels for running benchmarks/gpu_check.sh on a GPU machine that has its
# own CUDA torch, triton, numpy, opencv, scipy, matplotlib, ... but no
# network: boat-mm's OpenMMLab stack for that machine's Python, and mmcv.
#
# mmcv is the one with compiled code. If tools/setup_env.sh built mmcv
# 2.1.0 with CUDA ops here for that Python, torch and CUDA (the wheel cache
# is keyed on all three), that wheel is copied: then gpu_check.sh's
# `openmmlab` stage runs mmcv's CUDA ops and the segmentation, detection
# and classification tools on the GPU. To build it for the defaults (30 to
# 45 minutes on 2 cores; no GPU needed):
#
#   PYTHON=python3.12 VENV=/tmp/venv312 FORCE_CUDA=1 \
#       TORCH_CUDA_ARCH_LIST=9.0 TORCH_SPEC="torch==2.11.0 \
#       torchvision==0.26.0" bash tools/setup_env.sh
#
# Otherwise mmcv-lite (no ops): FSLA and the backbones need none, and that
# stage is skipped.
#
# Usage (here, with network):
#
#   bash benchmarks/gpu_wheels.sh [DEST] [PYTHON] [TORCH] [CUDA]
#
# defaults: .whl, 3.12, 2.11.0, 13.0 (the device machines of this project's
# workplace). There, before gpu_check.sh:
#
#   S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps \
#       --target $S DEST/*.whl && export PYTHONPATH=$S:$PWD
set -euo pipefail
DEST=${1:-.whl}
PYVER=${2:-3.12}
TORCH=${3:-2.11.0}
CUDA=${4:-13.0}
CACHE="${BOAT_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/boat-mm}"
TAG="py${PYVER/./}-torch$TORCH-cuda$CUDA"

mkdir -p "$DEST"
rm -f "$DEST"/mmcv-*.whl "$DEST"/mmcv_lite-*.whl
MMCV=$(ls "$CACHE"/mmcv-2.1.0-"$TAG"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 \
    || true)
LITE=()
if [ -n "$MMCV" ]; then
    cp "$MMCV" "$DEST"/
    echo "mmcv with CUDA ops: $MMCV"
else
    LITE=(mmcv-lite==2.1.0)
    echo "no mmcv wheel for $TAG in $CACHE: mmcv-lite (no ops)"
fi
# The pins of requirements/constraints.txt, and what they need beyond a
# CUDA image with torch, numpy, scipy, matplotlib, opencv, rich, pyyaml and
# pytest (yapf needs platformdirs, mmpretrain importlib-metadata and that
# lazy-importer; `modelindex` is the module of model-index; pycocotools,
# shapely, wcwidth: binary wheels).
python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${LITE[@]}" mmengine==0.10.7 mmpretrain==1.2.0 \
    mmsegmentation==1.2.2 mmdet==3.3.0 addict yapf platformdirs termcolor \
    importlib-metadata lazy-importer mat4py model-index ordered-set prettytable \
    wcwidth ftfy terminaltables pycocotools shapely
du -sh "$DEST"
