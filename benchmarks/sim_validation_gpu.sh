#!/usr/bin/env bash
# Real single-GPU runs for the simulator's validation (issue 10): one instance of a
# Llama-3-8B-shaped model with random bf16 weights (--load-format dummy) under three bursty
# workloads, then, on any machine, `python -m kunserve.sim.validate --grid gpu` against them.
#
#   bash benchmarks/sim_validation_gpu.sh OUT_DIR        # on the GPU (H100 in BENCHMARKS.md)
#   python -m kunserve.sim.validate --grid gpu --model llama3-8b \
#       --profile kunserve/data/profiles/h100-llama3-8b.json \
#       --calibrate OUT_DIR/gpu-w1 --validate OUT_DIR/gpu-w2 OUT_DIR/gpu-w3
#
# RUNS="gpu-w3" runs a subset. Needs the HTTP extras (fastapi, uvicorn, httpx, matplotlib, psutil); with WHEELS=dir they are
# installed from local wheels first (the lent GPU has no network).
set -euo pipefail
out=${1:?usage: sim_validation_gpu.sh OUT_DIR}
mkdir -p "$out"
if [[ -n "${WHEELS:-}" ]]; then
  python -m pip install -q --no-index --find-links "$WHEELS" fastapi uvicorn httpx matplotlib psutil
fi
model="$out/llama3-8b-shape"
# config.json of the shape + a word-level tokenizer over its whole vocabulary
python -c "import sys; from kunserve.bench._model_configs import write_dummy_model; write_dummy_model('llama3-8b', sys.argv[1])" "$model"
common=(--policies vllm --ranks 1 --model "$model" --serve-arg=--load-format --serve-arg=dummy
        --num-kv-blocks 1024 --block-size 16 --max-model-len 2048 --max-num-batched-tokens 2048 --tail-s 2)
declare -A workloads=(
  [gpu-w1]="--synthetic onoff --request-rate 4 --burst-rate 200 --off-s 4 --on-s 0.5 --num-prompts 300 --input-len 512 --output-len 128 --seed 1"
  [gpu-w2]="--synthetic onoff --request-rate 6 --burst-rate 300 --off-s 3 --on-s 0.4 --num-prompts 300 --input-len 384 --output-len 160 --seed 2"
  [gpu-w3]="--synthetic gamma --request-rate 20 --burstiness 0.3 --num-prompts 300 --input-len 512 --output-len 128 --seed 3"
)
for name in ${RUNS:-gpu-w1 gpu-w2 gpu-w3}; do
  # shellcheck disable=SC2086  # the workload's flags split on purpose
  python -m kunserve.bench compare "${common[@]}" ${workloads[$name]} --out "$out/$name"
done
