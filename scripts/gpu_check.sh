#!/usr/bin/env bash
# The checks that need a GPU, as one script: the trainer on CUDA with NCCL (fp32 ZeRO-0, a kill-free resume,
# ZeRO-1 with bf16 weights, ZeRO-2, ZeRO-3 with bf16 autocast), the search of a GPU-trained supernet with an
# export, and bench.gpu_step at full size.  Each check writes its log to $OUT (default /tmp/gpu_check) and
# the script ends with a one-line verdict per check.
#
#   scripts/gpu_check.sh                 # on a machine with one CUDA GPU, from the repository root
#   GPU_CHECK_CPU=1 scripts/gpu_check.sh # the same commands on the CPU (a dry run of this script)
#
# Python packages: the image's own; a folder .whl/ of wheels (DeepSpeed, webdataset and their missing needs),
# is installed to /tmp/site first when they do not import (for machines with no registry).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ] && ! $PY -c "import deepspeed, webdataset" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
BENCH_ARGS=${BENCH_ARGS:---space alphanet --batch 32 --steps 6}
EPOCHS=${EPOCHS:-4}
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    export DS_ACCELERATOR=cpu
    BENCH_ARGS="--cpu --space tiny --batch 4 --steps 1"
    EPOCHS=1
fi
RUNS=${RUNS:-/tmp/gpu_check_runs}  # run folders (checkpoints), kept out of $OUT
rm -rf "$RUNS"
declare -a VERDICTS

check() {  # check NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember the verdict
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    VERDICTS+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
    echo "== $name: rc=$rc ($((SECONDS - start)) s)"
    grep -E "val top-1|resumed from|final model|error|Error|exported|img/s" "$OUT/$name.log" | tail -6
}

{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} 2>&1 | grep -v "^\[" | tee "$OUT/env.log"

DS=("$PY" -c "from deepspeed.launcher.runner import main; main()" --num_gpus 1)
TRAIN=(trainer/run.py --config configs/tiny_cpu.yaml --set "optimizer.epochs=$EPOCHS" eval.every_epochs=2)

check prepare 120 "$PY" -m data_pipeline.prepare --source digits --out data/digits --formats webdataset --quiet
check train_zero0_part1 150 "${DS[@]}" "${TRAIN[@]}" "run_dir=$RUNS/z0" optimizer.max_steps=40
check train_zero0_resume 150 "${DS[@]}" "${TRAIN[@]}" "run_dir=$RUNS/z0"
check bench_gpu_step 300 "$PY" -m bench.gpu_step $BENCH_ARGS
check train_zero1_bf16 150 "${DS[@]}" "${TRAIN[@]}" "run_dir=$RUNS/z1bf16" engine.zero_stage=1 engine.precision=bf16
check train_zero2 150 "${DS[@]}" "${TRAIN[@]}" "run_dir=$RUNS/z2" engine.zero_stage=2
check train_zero3_autocast 150 "${DS[@]}" "${TRAIN[@]}" "run_dir=$RUNS/z3ac" engine.zero_stage=3 \
    engine.precision=bf16_autocast
check search_export 150 "$PY" search/run.py --config configs/search_tiny_cpu.yaml --run "$RUNS/z0" \
    --export tiny_m pareto@0.5

echo
sed -n '/^batch /,$p' "$OUT/bench_gpu_step.log" | grep -v "^\[" | head -40
echo
printf '%s\n' "${VERDICTS[@]}"
