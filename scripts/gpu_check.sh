#!/usr/bin/env bash
# The one GPU check, prepared to run on a lent GPU machine in a single device call (no GPU has
# been lent to this project yet, so it has only been dry-run on CPU: DRY_RUN=1). Prepare the
# wheels that machine lacks first, here: `bash scripts/gpu_wheels.sh`; then through the device
# tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540).
# Results land in $OUT (the device tool brings them back): one log per step, JSON last in each.
#   1 gpu_paths     NCCL collectives, bf16 matmul, flash SDPA, Megatron-core on CUDA, DeepSpeed bf16
#   2 memory        bench/memory.py on the GPU (allocator peaks: sequential vs naive vs n=1)
#   3 throughput    bench/throughput.py, bf16, a model big enough to keep the GPU busy
#   4 speculative   tiny-cpu recipe trained on the GPU, then bench/speculative.py on the GPU
#   5 plan_check    mtp plan's step memory vs the CUDA allocator's peak (one-process layouts)
#   6 block_cost    a 7B-shaped random-weight model in bf16: a w-token verify step (CUDA graph)
#                   vs a 1-token step, w = 1..8, and the speedup at 3.5 tokens per forward
# A step that fails or overruns its timeout is logged and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "${DRY_RUN:-0}" = 1 ]; then  # CPU, tiny sizes: checks the plumbing, measures nothing
  dev=cpu; mem=(--vocab 2000 --d-model 128 --seq 64); thr=(--steps 1 --warmup 1)
  train=(train.max_steps=4 train.device=cpu); spec=(--prompts 2 --max-tokens 16 --repeats 1)
  block=(--block-shape 128,6,344,1000)
else
  dev=cuda; mem=(--vocab 32000 --d-model 512 --seq 1024 --batch 2)
  thr=(--bf16 --d-model 1024 --layers 12 --vocab 32000 --seq 2048 --batch 8 --steps 10)
  train=(train.device=cuda); spec=(); block=()
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step() {  # step NAME SECONDS CMD...: run, log to $OUT/NAME.log, never stop the script
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? ($name)"; tail -n 3 "$OUT/$name.log" | cut -c1-400
}
step gpu_paths 180 python3 bench/gpu_paths.py --device "$dev"
step memory 120 python3 bench/memory.py --device "$dev" "${mem[@]}"
step throughput 120 python3 bench/throughput.py --device "$dev" "${thr[@]}"
step train_tiny 180 python3 -m mtp_dist.cli train configs/tiny-cpu.yaml run_dir=/tmp/gpu_tiny \
  tracking.enabled=false "${train[@]}"
step speculative 120 python3 bench/speculative.py --checkpoint /tmp/gpu_tiny --device "$dev" \
  "${spec[@]}"
step plan_check 120 python3 bench/plan_check.py --device "$dev" --layouts single,single_full
step block_cost 240 python3 bench/speculative.py --block-cost --device "$dev" "${block[@]}"
