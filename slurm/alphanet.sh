#!/usr/bin/env bash
# AlphaNet supernet training on SLURM: 2-8 nodes x 8 GPUs (16-64 GPUs), one task per GPU.
#   sbatch slurm/alphanet.sh                                   # settings below
#   sbatch --nodes=4 --export=ALL,RUN_DIR=runs/a4n slurm/alphanet.sh engine.zero_stage=2
# Extra arguments are --set overrides of the config. On the USR1 signal (300 s before the time
# limit, or `scancel --signal=USR1 JOBID`) every rank saves at the next step boundary, then rank 0
# requeues the job, which resumes from that checkpoint with the same command.
# Resuming on another node count (ZeRO 0-2): keep the global batch, data.batch_size x
# optimizer.gradient_accumulation_steps x GPUs, e.g. a 2-node run with accumulation 4 continues on 4 nodes with
#   sbatch --nodes=4 --export=ALL,RUN_DIR=runs/a4n slurm/alphanet.sh optimizer.gradient_accumulation_steps=2 --allow-config-change
# (weights, optimizer state, data position and RNG streams carry over; docs/training.md). A node count that
# cannot keep it stops at once with exit 2 and one line naming the values that would; so does ZeRO-3.
#SBATCH --job-name=alphanet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# ---- settings (override with sbatch --export=ALL,NAME=value) ------------------------------------
CONFIG=${CONFIG:-configs/alphanet_imagenet.yaml}
RUN_DIR=${RUN_DIR:-runs/alphanet_imagenet}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}          # 0: CPU nodes (gloo), as the tests run it
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
# --------------------------------------------------------------------------------------------------
if ! [[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]]; then
  echo "error: GPUS_PER_NODE must be a whole number (0 for CPU nodes), got '$GPUS_PER_NODE'" >&2
  exit 2
fi

cd "$REPO"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR  # the port is derived from SLURM_JOB_ID by the trainer's resolver (port_for_job)
export ALPHANET_REQUEUE_ON_SIGNAL=1
if [ "$GPUS_PER_NODE" -eq 0 ]; then export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}; fi
echo "[$(date -Is)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS task(s), master $MASTER_ADDR, run $RUN_DIR"
OVERRIDES=(); if [ $# -gt 0 ]; then OVERRIDES=(--set "$@"); fi
srun --kill-on-bad-exit=1 "$PYTHON" trainer/run.py --config "$CONFIG" --run-dir "$RUN_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
