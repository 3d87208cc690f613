#!/usr/bin/env bash
# Copyright (c) boat-mm contributors. All rights reserved.
#
# Everything a GPU machine checks, in one go: the Triton tests compiled on
# CUDA (with the tests marked `cuda`), the FSLA benchmark, the backbone
# benchmark, and mmcv's CUDA ops with the OpenMMLab tools on the GPU, each
# writing its output to a folder.
#
# Usage (from the repository root, in an environment with boat_mm's
# requirements and a CUDA torch/triton):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [STAGES]
#
# OUT_DIR defaults to $OUT, else work_dirs/gpu_check. STAGES is a
# comma-separated subset of tests,fsla,backbone,openmmlab (default: all),
# so a session with a per-command time limit can run them one by one.
# `openmmlab` needs mmcv built with CUDA ops for the machine's torch (on a
# machine without network: the wheels of benchmarks/gpu_wheels.sh), and is
# skipped, saying so, without them. `sanitize` (not in the default) runs
# the Triton tests' small cases under compute-sanitizer's memcheck, with
# torch's caching allocator off so that every tensor is its own
# allocation (SANITIZER names the binary). With
# BOAT_REF_REPO set to a checkout of mahaoyuHKU/pytorch-boat (needs timm and
# einops), the FSLA benchmark also times the published ContentAttention.
# Each stage runs under `timeout` (STAGE_TIMEOUT seconds, default 540) and
# keeps what it printed when stopped. DEVICE (default cuda), FSLA_ARGS and
# BACKBONE_ARGS change the benchmarks' arguments; a CPU smoke test:
#
#   DEVICE=cpu FSLA_ARGS='--shapes 14:32:2 --repeats 1' \
#       BACKBONE_ARGS=--quick bash benchmarks/gpu_check.sh OUT fsla,backbone
set -u -o pipefail
OUT_DIR=${1:-${OUT:-work_dirs/gpu_check}}
STAGES=${2:-tests,fsla,backbone,openmmlab}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
PY=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cuda}
# The Triton kernels' tests, run compiled on CUDA (and by `sanitize`).
TRITON_TESTS=(tests/test_ops/test_triton_attention.py
  tests/test_ops/test_triton_clustering.py tests/test_ops/test_triton_fsla.py)
# The OpenMMLab tools' tests (`openmmlab`).
OPENMMLAB_TESTS=(tests/test_mmcv_ops.py tests/test_tools/test_seg_e2e.py
  tests/test_tools/test_det_e2e.py tests/test_tools/test_cls_e2e.py)
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
status=0

run_stage() {  # name, stdout file, command...: stderr goes to name.log
  local name=$1 out=$2
  shift 2
  echo "== $name: $*" | tee -a "$OUT_DIR/summary.txt"
  local start=$SECONDS
  timeout "$STAGE_TIMEOUT" "$@" > >(tee "$out") \
    2> >(tee "$OUT_DIR/$name.log" >&2)
  local rc=$?
  # pytest's 5: no test selected (no other `cuda`-marked test).
  [ "$rc" -eq 5 ] && [ "$name" = tests-cuda-marked ] && rc=0
  echo "== $name: exit $rc after $((SECONDS - start)) s" \
    | tee -a "$OUT_DIR/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

{
  nvidia-smi || true
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton",
triton.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")'
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

case ",$STAGES," in *,tests,*)
  # The Triton test files run compiled on CUDA (every test of them, the
  # `cuda`-marked ones included), then the other `cuda`-marked tests.
  run_stage tests "$OUT_DIR/tests.txt" $PY -m pytest -p no:cacheprovider \
    -q -ra "${TRITON_TESTS[@]}"
  run_stage tests-cuda-marked "$OUT_DIR/tests_cuda_marked.txt" \
    $PY -m pytest -p no:cacheprovider -q -ra -m cuda tests \
    "${TRITON_TESTS[@]/#/--ignore=}" "${OPENMMLAB_TESTS[@]/#/--ignore=}"
  ;;
esac

case ",$STAGES," in *,fsla,*)
  # shellcheck disable=SC2086
  run_stage fsla "$OUT_DIR/fsla.md" $PY benchmarks/fsla.py \
    --device "$DEVICE" --repeats 10 --budget 3 \
    ${BOAT_REF_REPO:+--ref-repo "$BOAT_REF_REPO"} ${FSLA_ARGS:-}
  ;;
esac

case ",$STAGES," in *,backbone,*)
  # shellcheck disable=SC2086
  run_stage backbone "$OUT_DIR/backbone.md" $PY benchmarks/backbone.py \
    --device "$DEVICE" ${BACKBONE_ARGS:-}
  ;;
esac

case ",$STAGES," in *,openmmlab,*)
  # mmcv's CUDA ops, then mmseg's, mmdet's and mmpretrain's tools training,
  # testing and resuming our configs (tiny archs, generated data) on the
  # GPU, as MMEngine's runner picks it.
  if $PY -c "import sys, mmcv.ops
sys.exit(mmcv.ops.get_compiling_cuda_version() == 'not available')" \
      2>/dev/null; then
    run_stage openmmlab "$OUT_DIR/openmmlab.txt" $PY -m pytest \
      -p no:cacheprovider -q -ra "${OPENMMLAB_TESTS[@]}"
  else
    echo "== openmmlab: skipped: mmcv has no CUDA ops here (build them:" \
      "FORCE_CUDA=1 bash tools/setup_env.sh; offline: gpu_wheels.sh)" \
      | tee -a "$OUT_DIR/summary.txt"
  fi
  ;;
esac

case ",$STAGES," in *,sanitize,*)
  # Out-of-bounds or misaligned accesses of the Triton kernels (the
  # interpreter checks neither), on the tests' small problems.
  SANITIZER=${SANITIZER:-$(command -v compute-sanitizer \
    || echo /usr/local/cuda/bin/compute-sanitizer)}
  if [ -x "$SANITIZER" ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitize \
      "$OUT_DIR/sanitize.txt" "$SANITIZER" --tool memcheck \
      --error-exitcode 1 --print-limit 20 $PY -m pytest -p no:cacheprovider \
      -q -ra -m 'not cuda' "${TRITON_TESTS[@]}"
  else
    echo "== sanitize: skipped: no compute-sanitizer (SANITIZER=PATH)" \
      | tee -a "$OUT_DIR/summary.txt"
  fi
  ;;
esac

echo "outputs in $OUT_DIR"
exit $status
