#!/usr/bin/env bash
# Create .venv and install the pinned boat-mm stack into it.
#
# Order matters: torch + torchvision first (kept pinned through a constraint
# file), then the build tools, then mmcv 2.1.0 compiled from its sdist with
# its ops (once per machine: the wheel is cached outside the clone), then
# the OpenMMLab libraries and boat_mm itself in editable mode.
#
# A second run compares a stamp of the requirement files and checks that
# every library imports; when both hold it finishes in a few seconds.
#
# Environment:
#   VENV            virtualenv folder (default: .venv in the repo root)
#   PYTHON          interpreter that creates the venv (default: python3.11)
#   BOAT_MM_CACHE   where the built mmcv wheel is kept
#                   (default: ${XDG_CACHE_HOME:-~/.cache}/boat-mm)
#   BOAT_MM_WITH_OPS=0  skip compiling boat_mm's C++ kernels (the FSLA
#                   clustering then runs on tensor ops, slower on the CPU)
#   FORCE_CUDA=1    GPU machine: build mmcv's CUDA ops too (mmcv's own
#                   switch), against the installed torch, then run one of
#                   them on the GPU. Needs a toolkit of the CUDA version
#                   torch was built with, the one torch finds (CUDA_HOME,
#                   else nvcc's; nvcc's major version and the cuBLAS and
#                   cuSPARSE headers are checked), else, for torch's CUDA
#                   13 builds (the pin's), NVIDIA's compiler wheels of that
#                   version, installed into the venv.
#                   A toolkit of another major version than torch's CUDA 13
#                   is passed over for those wheels too.
#                   FSLA itself needs nothing built for the GPU: its
#                   Triton kernels come with torch's CUDA wheels.
#   TORCH_CUDA_ARCH_LIST  the GPUs mmcv's CUDA ops are built for (torch's
#                   switch; e.g. "9.0" for H100). Unset, torch builds for
#                   the visible GPU, or for every architecture if none is.
#   TORCH_INDEX_URL torch/torchvision from this index instead of PyPI's
#                   default build (e.g. https://download.pytorch.org/whl/cu126
#                   for another CUDA version; the versions stay the pins).
#                   pip keeps an installed torch of the pinned version:
#                   use it on a new venv (`make clean-venv` first)
#   TORCH_SPEC      torch and torchvision requirements instead of the pins
#                   (default "torch==2.14.1 torchvision==0.29.1"), of the
#                   supported range (torch >= 2.4.1), e.g. to build the
#                   mmcv wheel for another machine's torch (its wheel cache
#                   is keyed on Python, torch and CUDA versions)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
CACHE="${BOAT_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/boat-mm}"
MMCV_VERSION=2.1.0
FORCE_CUDA="${FORCE_CUDA:-0}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
PINNED_TORCH=$(grep -E '^(torch|torchvision)==' "$CONSTRAINTS" | paste -sd' ')
TORCH_SPEC="${TORCH_SPEC:-$PINNED_TORCH}"
if [ "$TORCH_SPEC" != "$PINNED_TORCH" ]; then
    # The other pins hold; torch and torchvision are TORCH_SPEC's.
    OTHER_PINS=$(mktemp)
    grep -v -E '^(torch|torchvision)==' "$CONSTRAINTS" > "$OTHER_PINS"
    CONSTRAINTS=$OTHER_PINS
fi
START=$(date +%s)

log() { printf '[setup %4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

stamp_of() {
    # The C++ sources too: a change rebuilds boat_mm._C.
    # A GPU build (FORCE_CUDA=1) is another environment.
    { cat "$ROOT"/requirements/*.txt "$ROOT/setup.py" "$ROOT/pyproject.toml" \
        "$ROOT/tools/setup_env.sh" "$ROOT"/boat_mm/ops/csrc/*
      [ "${FORCE_CUDA:-0}" = "1" ] && echo "FORCE_CUDA=1"
      echo "$TORCH_SPEC"; } \
        | sha256sum | cut -d' ' -f1
}

imports_ok() {
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import torch, torchvision, mmcv, mmcv.ops, mmengine, mmseg, mmpretrain
import boat_mm, pytest
import mmdet, mmdet.models, pycocotools.coco, shapely, terminaltables
import onnx, onnxscript, onnxruntime  # ONNX export and its tests
import importlib.util  # upstream tools' packages: found, not imported (slow)
assert all(importlib.util.find_spec(m)
           for m in ('pytorch_grad_cam', 'seaborn', 'psutil'))
from torchvision.ops import nms  # the compiled torchvision ops are real
import os
if os.environ.get('BOAT_MM_WITH_OPS', '1') != '0':
    import boat_mm._C  # the C++ kernels are built
EOF
}

STAMP_FILE="$VENV/.boat_mm_setup_stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP_FILE" ] \
        && [ "$(cat "$STAMP_FILE")" = "$(stamp_of)" ] && imports_ok; then
    log "environment in $VENV is up to date (nothing to do)"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

log "installing $TORCH_SPEC (first, pinned)"
"${PIP[@]}" install -q $TORCH_SPEC -c "$CONSTRAINTS" \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

if [ "$FORCE_CUDA" = "1" ]; then
    # mmcv's CUDA ops must be compiled by the toolkit of torch's CUDA, the
    # one torch's extension builder finds (CUDA_HOME, else from nvcc).
    TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
    if [ -z "$TORCH_CUDA" ]; then
        log "ERROR: FORCE_CUDA=1 but this torch is a CPU build; install a CUDA build (TORCH_INDEX_URL)"
        exit 2
    fi
    complete() {  # nvcc and the headers of the CUDA libraries ATen includes
        [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ] \
            && [ -f "$1/include/cusparse.h" ] && [ -f "$1/include/cublas_v2.h" ]
    }
    nvcc_version() {  # "13.0" for the toolkit in $1
        "$1/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'
    }
    CUDA_HOME=$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)
    FOUND="${CUDA_HOME:-none}"
    complete "$CUDA_HOME" && FOUND="$CUDA_HOME, CUDA $(nvcc_version "$CUDA_HOME")"
    if [ "${TORCH_CUDA%%.*}" = "13" ] && { ! complete "$CUDA_HOME" \
            || [ "$(nvcc_version "$CUDA_HOME" | cut -d. -f1)" != "13" ]; }; then
        # No complete CUDA 13 toolkit: NVIDIA's compiler wheels of torch's
        # CUDA version, into the nvidia/cu13 tree where torch's CUDA wheels
        # keep the runtime, cuBLAS, cuSPARSE, ... headers and libraries.
        log "no complete CUDA 13 toolkit ($FOUND): installing NVIDIA's CUDA $TORCH_CUDA compiler wheels into $VENV"
        "${PIP[@]}" install -q --no-deps "nvidia-cuda-nvcc==$TORCH_CUDA.*" \
            "nvidia-nvvm==$TORCH_CUDA.*" "nvidia-cuda-crt==$TORCH_CUDA.*" \
            "nvidia-cuda-cccl==$TORCH_CUDA.*"
        CUDA_HOME=$("$PY" -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
        # The build links -lcudart from CUDA_HOME/lib64.
        ln -sfn lib "$CUDA_HOME/lib64"
        ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
    fi
    if ! complete "$CUDA_HOME"; then
        log "ERROR: FORCE_CUDA=1 needs a CUDA $TORCH_CUDA toolkit with nvcc and the cuBLAS/cuSPARSE headers; found ${CUDA_HOME:-none}: set CUDA_HOME to one"
        exit 2
    fi
    export CUDA_HOME
    NVCC_CUDA=$(nvcc_version "$CUDA_HOME")
    if [ "${NVCC_CUDA%%.*}" != "${TORCH_CUDA%%.*}" ]; then
        log "ERROR: nvcc is CUDA $NVCC_CUDA, torch was built with CUDA $TORCH_CUDA; use a toolkit of CUDA ${TORCH_CUDA%%.*}.x or a torch build for $NVCC_CUDA (TORCH_INDEX_URL)"
        exit 2
    fi
    log "FORCE_CUDA=1: mmcv's CUDA ops are built with nvcc $NVCC_CUDA for torch's CUDA $TORCH_CUDA"
fi

log "installing build tools (setuptools<82, wheel, ninja, numpy, opencv)"
"${PIP[@]}" install -q -r "$ROOT/requirements/build.txt" -c "$CONSTRAINTS"

if "$PY" -c "import mmcv, mmcv.ops, torch
assert mmcv.__version__ == '$MMCV_VERSION'
if '$FORCE_CUDA' == '1':  # built with the CUDA ops: one runs on the GPU
    boxes = torch.tensor([[0., 0., 1., 1.]], device='cuda')
    mmcv.ops.nms(boxes, torch.ones(1, device='cuda'), 0.5)
" >/dev/null 2>&1; then
    log "mmcv $MMCV_VERSION with ops already installed"
else
    # The wheel depends on the torch ABI and the Python version: key on both.
    TAG=$("$PY" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split(\"+\")[0]}')")
    if [ "$FORCE_CUDA" = "1" ]; then
        TAG="$TAG-cuda$TORCH_CUDA"
    fi
    WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-$TAG"
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$WHEEL" ]; then
        log "building mmcv $MMCV_VERSION with ops from source (once per machine, ~10 min)"
        BUILD=$(mktemp -d)
        trap 'rm -rf "$BUILD"' EXIT
        "${PIP[@]}" download -q --no-binary :all: --no-deps \
            "mmcv==$MMCV_VERSION" -d "$BUILD"
        tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
        SRC="$BUILD/mmcv-$MMCV_VERSION"
        # torch >= 2.14 headers need C++20; mmcv 2.1.0 asks for C++17.
        sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
        mkdir -p "$WHEEL_DIR"
        MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" wheel -q --no-build-isolation --no-deps \
            -w "$WHEEL_DIR" "$SRC"
        WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
        log "cached $WHEEL"
    else
        log "reusing cached $WHEEL"
    fi
    "${PIP[@]}" install -q --no-deps "$WHEEL"
    if [ "$FORCE_CUDA" = "1" ]; then
        if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
            GPU=$("$PY" -c "import torch, mmcv.ops
boxes = torch.tensor([[0., 0., 1., 1.], [0., 0., 1., .9]], device='cuda')
_, keep = mmcv.ops.nms(boxes, torch.tensor([1., .5], device='cuda'), 0.5)
assert keep.tolist() == [0], keep
print(torch.cuda.get_device_name())")
            log "mmcv's CUDA ops run on the $GPU"
        else
            log "built mmcv's CUDA ops; no GPU is visible here, so none ran"
        fi
    fi
fi

log "installing mmengine, mmsegmentation, mmpretrain and test tools"
"${PIP[@]}" install -q -r "$ROOT/requirements/mminstall.txt" \
    -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt" \
    -r "$ROOT/requirements/optional.txt" -c "$CONSTRAINTS"

log "installing boat_mm (editable; compiles its C++ kernels, ~40 s)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"

if ! imports_ok; then
    log "ERROR: the environment does not import cleanly:"
    "$PY" -c "import torch, torchvision, mmcv.ops, mmengine, mmseg, mmpretrain, boat_mm, onnx, onnxscript, onnxruntime"
    exit 1
fi
stamp_of > "$STAMP_FILE"
log "done: $(du -sh "$VENV" | cut -f1) in $VENV"
