#!/usr/bin/env bash
# Distributed testing on one or more machines with torchrun.
#
# Usage: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py args]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
# Without GPUs, GPUS processes test on the CPU (gloo backend).
# PYTHON selects the interpreter (default: python on PATH).
set -e
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

${PYTHON:-python} -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
