#!/usr/bin/env bash
# Sourced by dist_train.sh and dist_test.sh: dist_launch NPROC TOOL ARGS...
# runs tools/TOOL with ARGS in NPROC processes under torchrun.
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
# PYTHON selects the interpreter (default: python on PATH).
dist_launch() {
    local nproc=$1 tool=$2
    shift 2
    ${PYTHON:-python} -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$nproc" \
        --master_port="${PORT:-29500}" \
        "$(dirname "${BASH_SOURCE[0]}")/$tool" \
        "$@"
}
