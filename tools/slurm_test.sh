#!/usr/bin/env bash
# Distributed testing as a Slurm job step (srun), one task per GPU.
#
# Usage: [GPUS=16] bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG \
#            CHECKPOINT [tools/test.py arguments]
# GPUS: tasks (GPUs) in all, default 8; GPUS_PER_NODE: tasks per node,
# default the smaller of GPUS and 8; CPUS_PER_TASK: default 5;
# SRUN_ARGS: more srun options, e.g. SRUN_ARGS="--quotatype=auto".
# The same arguments as the slurm_test.sh of mmsegmentation, mmpretrain
# and mmdetection. PYTHON selects the interpreter (default: python).
set -e
source "$(dirname "$0")/dist_launch.sh"
usage_check 'PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]' 4 "$@"
slurm_launch "$1" "$2" test.py "$3" "$4" --launcher="slurm" "${@:5}"
