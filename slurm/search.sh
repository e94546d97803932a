#!/usr/bin/env bash
# Evolutionary search of a trained run on SLURM; any number of tasks (candidates split unevenly).
#   sbatch --export=ALL,RUN_DIR=runs/alphanet_imagenet slurm/search.sh --export a1 pareto@300
# Extra arguments go to search/run.py (the search entry point). Resubmitting continues from RUN_DIR/search/candidates.jsonl.
#SBATCH --job-name=alphanet-search
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# ---- settings (override with sbatch --export=ALL,NAME=value) ------------------------------------
SEARCH_CONFIG=${SEARCH_CONFIG:-configs/search_alphanet.yaml}
RUN_DIR=${RUN_DIR:-runs/alphanet_imagenet}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}          # 0: CPU nodes (gloo)
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
if [ "$GPUS_PER_NODE" -eq 0 ]; then export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}; fi
echo "[$(date -Is)] search job $SLURM_JOB_ID: $SLURM_NTASKS task(s), run $RUN_DIR"
srun --kill-on-bad-exit=1 "$PYTHON" search/run.py --config "$SEARCH_CONFIG" --run-dir "$RUN_DIR" "$@"
