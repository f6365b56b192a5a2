#!/usr/bin/env bash
# One node, all its GPUs: the SFBD loop (pretrain -> K iterations of denoise + fine-tune + FID).
# Usage: sbatch scripts/slurm_single_node.sh PRESET CLEAN NOISY FIDREF OUTDIR [extra sfbd.py flags]
#   e.g. sbatch scripts/slurm_single_node.sh cifar10-ddpmpp data/cifar10-clean-4pct.zip \
#          data/cifar10-noisy-0.2 fid-refs/cifar10-rest.npz runs/cifar10-4pct
#SBATCH --job-name=sfbd
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
PRESET=$1; CLEAN=$2; NOISY=$3; FIDREF=$4; OUTDIR=$5; shift 5
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NGPU=$(nvidia-smi --list-gpus | wc -l)
# Rerunning the same command resumes: finished iterations are skipped, shards and states are kept.
exec .venv/bin/torchrun --standalone --nproc_per_node="$NGPU" sfbd.py --config="$PRESET" \
    --clean="$CLEAN" --noisy="$NOISY" --fid-ref="$FIDREF" --outdir="$OUTDIR" "$@"
