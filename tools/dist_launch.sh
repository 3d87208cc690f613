#!/usr/bin/env bash
# Sourced by the launch scripts of tools/; PYTHON selects the interpreter
# (default: python on PATH).
#
# dist_launch NPROC TOOL ARGS... (dist_train.sh, dist_test.sh) runs
# tools/TOOL with ARGS in NPROC processes under torchrun. Several machines:
# set NNODES, NODE_RANK, MASTER_ADDR and PORT on each.
#
# slurm_launch PARTITION JOB_NAME TOOL ARGS... (slurm_train.sh,
# slurm_test.sh) runs tools/TOOL with ARGS (which hold --launcher="slurm")
# in a Slurm job step of GPUS tasks, one GPU each: the srun command of the
# slurm_*.sh scripts of mmsegmentation, mmpretrain and mmdetection.
# Environment: GPUS (default 8), GPUS_PER_NODE (default the smaller of
# GPUS and 8), CPUS_PER_TASK (default 5), SRUN_ARGS (more srun options).
#
# check_count NAME VALUE [WORD...] exits with the tools' one-line error
# (status 2) unless VALUE is a positive integer or one of the WORDs.
#
# usage_check USAGE NARGS ARGS... prints the calling script's header for
# -h/--help, and exits with the tools' one-line error (status 2) when ARGS
# are fewer than NARGS.

TOOLS_DIR=$(dirname "${BASH_SOURCE[0]}")

check_count() {
    local name=$1 value=$2 word also=''
    shift 2
    [[ $value =~ ^[1-9][0-9]*$ ]] && return 0
    for word in "$@"; do
        [ "$value" = "$word" ] && return 0
    done
    [ $# -gt 0 ] && also=" (or one of $*)"
    echo "$(basename "$0"): error: $name must be a positive integer$also," \
        "got '$value'" >&2
    exit 2
}

dist_launch() {
    local nproc=$1 tool=$2
    shift 2
    # Else torchrun's bare AssertionError (0) or ValueError traceback;
    # its own words for "one per device" pass.
    check_count GPUS "$nproc" auto cpu gpu xpu
    ${PYTHON:-python} -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$nproc" \
        --master_port="${PORT:-29500}" \
        "$TOOLS_DIR/$tool" \
        "$@"
}

slurm_launch() {
    local partition=$1 job_name=$2 tool=$3 gpus=${GPUS:-8} name
    shift 3
    for name in GPUS GPUS_PER_NODE CPUS_PER_TASK; do
        [ -z "${!name}" ] || check_count "$name" "${!name}"
    done
    # Upstream's default is 8 (4 for mmseg) whatever GPUS: GPUS=2 would
    # hold a node's 8 GPUs for 2 tasks.
    local per_node=${GPUS_PER_NODE:-$((gpus < 8 ? gpus : 8))}
    local srun_args
    # Split as upstream's unquoted ${SRUN_ARGS}, without globbing.
    read -r -a srun_args <<<"${SRUN_ARGS:-}"
    srun -p "$partition" \
        --job-name="$job_name" \
        --gres=gpu:"$per_node" \
        --ntasks="$gpus" \
        --ntasks-per-node="$per_node" \
        --cpus-per-task="${CPUS_PER_TASK:-5}" \
        --kill-on-bad-exit=1 \
        "${srun_args[@]}" \
        ${PYTHON:-python} -u "$TOOLS_DIR/$tool" "$@"
}

usage_check() {
    local usage=$1 nargs=$2
    shift 2
    case $1 in -h | --help)
        # The script's header: its usage and environment variables.
        sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
        exit 0
        ;;
    esac
    if [ $# -lt "$nargs" ]; then
        echo "$(basename "$0"): error: $nargs arguments needed, got $#;" \
            "usage: bash $0 $usage" >&2
        exit 2
    fi
}
