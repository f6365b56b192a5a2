#!/usr/bin/env bash
# Several nodes: one torchrun per node, joined by the c10d rendezvous on the first node.
# Usage: sbatch --nodes=4 scripts/slurm_multi_node.sh PRESET CLEAN NOISY FIDREF OUTDIR [extra sfbd.py flags]
# OUTDIR and the data must be on a file system every node sees.
#SBATCH --job-name=sfbd-multi
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
PRESET=$1; CLEAN=$2; NOISY=$3; FIDREF=$4; OUTDIR=$5; shift 5
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$SLURM_GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \
    sfbd.py --config="$PRESET" --clean="$CLEAN" --noisy="$NOISY" --fid-ref="$FIDREF" --outdir="$OUTDIR" "$@"
