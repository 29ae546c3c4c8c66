#!/usr/bin/env bash
# End to end on several GPUs of one host (issue 11): RANKS instances (one per GPU) of a
# Qwen-2.5-14B-shaped model with random bf16 weights (--load-format dummy) behind the real HTTP
# server, NCCL between the GPUs, under one burst; kunserve vs the baselines (kunserve.bench compare).
#
#   WHEELS=dir bash benchmarks/compare_gpu.sh OUT_DIR [RANKS]
#
# The defaults are the run in BENCHMARKS.md ("Multi-GPU"): 2,048 KV blocks of 16 tokens per GPU
# (32K tokens, far below the paper's memory ratio, so that a 150-request burst overflows them;
# ~3 minutes for two policies on 2 x H200). KV_BLOCKS, POLICIES and WORKLOAD override: the paper's
# ratio is KV_BLOCKS=14336 (45 GB of Qwen-14B KV: the 29.5 GB of weights are about a third of an
# 80 GB GPU) with a burst of ~500 requests of 2,048 / 512 tokens, which ran past 10 minutes.
set -euo pipefail
out=${1:?usage: compare_gpu.sh OUT_DIR [RANKS]}
ranks=${2:-2}
mkdir -p "$out"
if [[ -n "${WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --find-links "$WHEELS" fastapi uvicorn httpx matplotlib psutil
fi
model="$out/qwen2.5-14b-shape"
python3 -c "import sys; from kunserve.bench._model_configs import write_dummy_model; write_dummy_model('qwen2.5-14b', sys.argv[1])" "$model"
# shellcheck disable=SC2086  # POLICIES and WORKLOAD split on purpose
python3 -m kunserve.bench compare --policies ${POLICIES:-vllm kunserve} --ranks "$ranks" --model "$model" \
  --serve-arg=--load-format --serve-arg=dummy --num-kv-blocks "${KV_BLOCKS:-2048}" --block-size 16 \
  --max-model-len 8192 --max-num-batched-tokens 2048 --tail-s 5 \
  ${WORKLOAD:---synthetic onoff --request-rate 2 --burst-rate 150 --off-s 2 --on-s 1 --num-prompts 150 --input-len 1024 --output-len 128 --len-jitter 0.5 --seed 1} \
  --out "$out/e2e"
