#!/usr/bin/env bash
# Distributed testing on one or more machines with torchrun.
#
# Usage: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py args]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
# Without GPUs, GPUS processes test on the CPU (gloo backend).
# PYTHON selects the interpreter (default: python on PATH).
set -e
source "$(dirname "$0")/dist_launch.sh"
usage_check 'CONFIG CHECKPOINT GPUS [tools/test.py arguments]' 3 "$@"
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
dist_launch "$GPUS" test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch \
    "${@:4}"
