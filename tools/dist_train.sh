#!/usr/bin/env bash
# Distributed training on one or more machines with torchrun.
#
# Usage: bash tools/dist_train.sh CONFIG GPUS [tools/train.py arguments]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
# Without GPUs, GPUS processes train on the CPU (gloo backend).
# PYTHON selects the interpreter (default: python on PATH).
set -e
source "$(dirname "$0")/dist_launch.sh"
usage_check 'CONFIG GPUS [tools/train.py arguments]' 2 "$@"
CONFIG=$1
GPUS=$2
dist_launch "$GPUS" train.py "$CONFIG" --launcher pytorch "${@:3}"
