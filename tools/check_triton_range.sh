#!/usr/bin/env bash
# Run FSLA's Triton kernel tests in the interpreter of other Triton releases.
#
# For each version given (default below), installs that Triton and a
# numpy below 2.3 (the interpreters before Triton 3.7 fail on numpy 2.3's
# scalar conversion, whatever the kernel) into a folder of its own under
# WORK, puts it before the project's .venv on PYTHONPATH, runs the Triton
# test files there (TRITON_INTERPRET=1, CPU tensors; with
# BOAT_MM_TRITON_TESTS=all, so that the tests marked `triton` run below
# TRITON_MIN_TESTED too, where they skip otherwise) and prints, per
# version, pytest's summary and the failed tests by cause (the
# impl='triton' cases of test_tie_breaking.py and
# test_uninitialized_memory.py are not among them; under 3.5.1 with numpy
# 2.2.6 they pass). The kernels compiled for a GPU are another matter:
# this shows what each Triton's interpreter computes, the only check of
# the kernels' results here.
#
# Found on 2026-12-07 (torch 2.14.1, numpy 2.2.6; 127 tests, 18 skipped
# for CUDA; "compile facts": the sm_90 register and shared-memory bounds
# and tests that read Triton's internals, which differ by release):
#   3.8.0, 3.7.1  all pass
#   3.6.0         all results pass; 2 compile facts differ
#   3.5.1         all results pass; 4 compile facts differ
#   3.4.0, 3.3.1  the float64 tests fail (the interpreter has no float64
#                 dot, 39), and 3.3.1's lacks get_int1_ty (3); the other
#                 results pass
#   3.1.0         wrong permutations from the clustering (92 failed)
#
#   bash tools/check_triton_range.sh [VERSION ...]
#
# Environment: WORK (default /tmp/boat-triton-range), PYTHON (default the
# project's .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/boat-triton-range}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.3.1 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0)
TESTS=(tests/test_ops/test_triton_attention.py
  tests/test_ops/test_triton_clustering.py
  tests/test_ops/test_triton_clustering_schedule.py
  tests/test_ops/test_triton_fsla.py)

cd "$ROOT"
PYVER=$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
for version in "${VERSIONS[@]}"; do
    target="$WORK/triton-$version-$PYVER"
    # Reused only when both packages landed (an interrupted install would
    # run the venv's numpy, which these interpreters fail on).
    if [ ! -d "$target/triton" ] || [ ! -d "$target/numpy" ]; then
        rm -rf "$target"
        if ! "$PY" -m pip install -q --disable-pip-version-check \
            --no-deps --target "$target" "triton==$version" "numpy<2.3"; then
            echo "== triton $version: could not be installed, skipped"
            continue
        fi
    fi
    log="$target.log"
    set +e
    PYTHONPATH="$target:$ROOT" TRITON_INTERPRET=1 OMP_NUM_THREADS=2 \
        BOAT_MM_TRITON_TESTS=all \
        "$PY" -m pytest -p no:cacheprovider -o addopts= -q "${TESTS[@]}" \
        > "$log" 2>&1
    set -e
    echo "== triton $version: $(tail -n 1 "$log")"
    # The failed tests, without parameters, counted; then the causes.
    grep '^FAILED' "$log" | sed 's/^FAILED //; s/\[.*//; s/ - .*//' \
        | sort | uniq -c | sort -rn | sed 's/^/   /' || true
    echo "   of which the interpreter's missing float64 dot:" \
        "$(grep -c "Unsupported lhs dtype fp64')\")$" "$log" || true)"
done
