#!/usr/bin/env bash
# Distributed training on one or more machines with torchrun.
#
# Usage: bash tools/dist_train.sh CONFIG GPUS [tools/train.py arguments]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
# Without GPUs, GPUS processes train on the CPU (gloo backend).
# PYTHON selects the interpreter (default: python on PATH).
set -e
CONFIG=$1
GPUS=$2
source "$(dirname "$0")/dist_launch.sh"
dist_launch "$GPUS" train.py "$CONFIG" --launcher pytorch "${@:3}"
