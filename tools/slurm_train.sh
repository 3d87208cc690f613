#!/usr/bin/env bash
# Distributed training as a Slurm job step (srun), one task per GPU.
#
# Usage: [GPUS=16] bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG \
#            WORK_DIR [tools/train.py arguments]
# GPUS: tasks (GPUs) in all, default 8; GPUS_PER_NODE: tasks per node,
# default the smaller of GPUS and 8; CPUS_PER_TASK: default 5;
# SRUN_ARGS: more srun options, e.g. SRUN_ARGS="--quotatype=auto".
# The same arguments as the slurm_train.sh of mmpretrain and mmdetection;
# mmsegmentation's form, without WORK_DIR (CONFIG followed by options
# such as --work-dir DIR), works too. PYTHON selects the interpreter
# (default: python).
set -e
source "$(dirname "$0")/dist_launch.sh"
usage_check 'PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py args]' 3 "$@"
if [[ $# -eq 3 || $4 == -* ]]; then
    slurm_launch "$1" "$2" train.py "$3" --launcher="slurm" "${@:4}"
else
    slurm_launch "$1" "$2" train.py "$3" --work-dir="$4" \
        --launcher="slurm" "${@:5}"
fi
