#!/usr/bin/env bash
# The demo of the README (`make demo` runs it after the set-up): generate
# the synthetic ADE20K-like data, train BOAT-CSWin + UPerNet on the CPU,
# test it, print the mIoU and draw the predictions. See tools/run_demo.py
# for the options (e.g. bash tools/demo.sh --work-dir work_dirs/demo2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    echo "No $PYTHON: run \`make setup\` (or bash tools/setup_env.sh) first," \
         "or set PYTHON to an interpreter with boat_mm installed." >&2
    exit 1
fi
exec "$PYTHON" tools/run_demo.py "$@"
