#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run that fits a short lease of a GPU machine:
#   tests    the engine's CUDA-only tests: swaps, copy-on-write (one kernel launch each, the
#            swap pool addressed in place), decode graphs, steps launched ahead; and each
#            prefill tile the GPU may choose, against the reference
#   steps    python -m pagedserve.benchmarks.steps, bf16, decode graphs: 32 sequences with
#            steps overlapped (--overlap) and not, 10 graph-replayed decode steps under
#            torch's profiler (host and GPU time per operator, in steps.txt; the GPU's
#            idle share between them), mixed with --overlap
#   serve    pagedserve up on the GPU, then bench throughput on both workloads (and the step
#            cost from stats): with the defaults and with --overlap-steps off
#   kernels  python -m pagedserve.benchmarks.kernels (paged decode/prefill vs SDPA, block
#            copies, swaps)
#   peers    whether vLLM or SGLang is installed there (issue 24 asks for the ratio to one
#            where it is; none has been: when one is, run `pagedserve bench compare` with it)
#   steps-more   the shared workloads without --overlap, with --enforce-eager and with the
#            torch backend
#   serve-more   serving with --no-async-scheduling and with --enforce-eager
#   kernel-tests  the kernel tests (attention, block copies, layer ops), against references
# Steps and serve use SmolLM2's shape with random weights: step times do not depend on the
# weights' values, and the workloads ignore EOS.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR CONFIG_DIR [PART...]     (default: every part)
#
# CONFIG_DIR holds SmolLM2's config.json and tokenizer files (no weights needed). Parts run in
# the order above, most wanted first, and within a part so do its runs; each run has its own
# time limit, so that one slow run still leaves the others' results in OUT_DIR. DEADLINE_S
# (seconds from the start) bounds the whole: a run's limit is cut to what is left of it, and
# a run with under 20 s left is skipped and said so (benchmarks/gpu_lease.sh sets it).
set -uo pipefail
out=${1:?OUT_DIR}
config=${2:?CONFIG_DIR}
shift 2
parts=${*:-tests steps serve kernels peers steps-more serve-more kernel-tests}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu tries the script out on a machine without a GPU
[[ $device == cpu ]] && export TRITON_INTERPRET=1  # (the triton runs: slowly)
model=/tmp/pagedserve-random-smollm2
deadline=${DEADLINE_S:-1000000}

# limit N: N seconds, or what is left before the deadline less a margin if that is less;
# fails (and says so) when too little is left to start the run.
limit() {
    local left=$((deadline - SECONDS - 10))
    if ((left < 20)); then
        echo "   skipped, ${left}s left before the deadline: $2" | tee -a "$out/skipped.txt" >&2
        return 1
    fi
    echo $(($1 < left ? $1 : left))
}

nvidia-smi -L
"$py" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
if [[ $parts == *steps* || $parts == *serve* ]] && [[ ! -d $model ]]; then
    "$py" -c "import sys; from pathlib import Path; from pagedserve.benchmarks.steps import random_checkpoint
random_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))" "$config" "$model" 2>&1 | grep -v Writing
fi

for part in $parts; do
    case $part in
    tests)
        echo "== engine tests on the GPU"
        # (150 s: the first prefill of each shape times six tiles)
        t=$(limit 150 "engine tests") || continue
        timeout "$t" "$py" -m pytest -q -p no:cacheprovider tests/test_engine.py \
            tests/test_triton_backend.py tests/test_block_ops.py tests/test_kernels_prefill.py \
            -k "cuda or graphs or every_tile" -m "not slow" 2>&1 | tee "$out/tests.log" \
            | grep -E "passed|failed|error|FAILED|ERROR|Error" | tail -30
        ;;
    steps | steps-more)
        echo "== engine steps in process"
        if [[ $part == steps ]]; then
            runs=("fixed triton --requests=32 --overlap" "fixed triton --requests=32"
                  "fixed triton --profile-from=20 --overlap" "mixed triton --overlap")
        else
            runs=("fixed triton" "mixed triton" "fixed triton --enforce-eager" "fixed torch")
        fi
        for run in "${runs[@]}"; do
            t=$(limit 90 "steps $run") || continue
            set -- $run
            echo "-- steps $run" >> "$out/steps.txt"
            timeout "$t" "$py" -m pagedserve.benchmarks.steps --workload "$1" \
                --attention-backend "$2" ${@:3} --device "$device" --dtype bfloat16 \
                --model "$model" 2>&1 | tee -a "$out/steps.txt" \
                | grep -E "workload|backend|graphs|overlap|ahead|tok_s|ms_p50|gpu_|Error"
        done
        ;;
    serve | serve-more)
        echo "== pagedserve up on the GPU, bench throughput"
        # the defaults (decode graphs, async scheduling, overlapping steps), then each turned off
        if [[ $part == serve ]]; then
            runs=(--defaults "--overlap-steps off")
        else
            runs=(--no-async-scheduling --enforce-eager)
        fi
        for flags in "${runs[@]}"; do
            t=$(limit 150 "serve $flags") || continue
            [[ $flags == --defaults ]] && set -- || set -- $flags
            name=${flags// /}
            # the ZeroMQ client's path: the gateway is measured apart (benchmarks.gateway_cost)
            "$py" -m pagedserve.common.cli up --device "$device" --model "$model" "$@" \
                --no-http --ready-timeout 150 > "$out/up$name.log" 2>&1 &
            up=$!
            for _ in $(seq $((t < 120 ? t : 120))); do
                grep -q "pagedserve ready" "$out/up$name.log" && break
                kill -0 $up 2> /dev/null || break
                sleep 1
            done
            if ! grep -q "pagedserve ready" "$out/up$name.log"; then
                echo "   not ready:"; tail -5 "$out/up$name.log"
                kill -INT $up 2> /dev/null; wait $up
                continue
            fi
            for workload in fixed mixed; do
                echo "$flags $workload"
                t=$(limit 60 "serve $flags $workload") || continue
                echo "-- serve $flags $workload" >> "$out/serve.jsonl"
                timeout "$t" "$py" -m pagedserve.common.cli bench throughput \
                    --workload $workload --json 2>&1 | tee -a "$out/serve.jsonl" | tail -2
                "$py" -m pagedserve.common.cli stats --json 2>&1 | "$py" -c \
                    "import json, sys; print(json.dumps(json.load(sys.stdin)['step_cost']))" \
                    | tee -a "$out/serve.jsonl"
            done
            kill -INT $up; wait $up || true
            grep -E "graphs captured|Error|error" "$out/up$name.log" | tail -5
        done
        ;;
    peers)
        echo "== peers on this machine"
        for peer in vllm sglang; do
            "$py" -c "import $peer; print('$peer', $peer.__version__, 'is installed')" 2> /dev/null \
                || echo "$peer is not installed"
        done | tee "$out/peers.txt"
        ;;
    kernels)
        echo "== kernel benchmark"
        t=$(limit 150 "kernel benchmark") || continue
        timeout "$t" "$py" -m pagedserve.benchmarks.kernels --json > "$out/kernels.json" \
            2> "$out/kernels.err"
        echo "rc=$?"; tail -3 "$out/kernels.err"
        ;;
    kernel-tests)
        echo "== kernel tests on the GPU"
        t=$(limit 150 "kernel tests") || continue
        timeout "$t" "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_layer_ops.py \
            tests/test_kernels_decode.py tests/test_kernels_prefill.py 2>&1 \
            | tee "$out/kernel-tests.log" | grep -E "passed|failed|error|FAILED|ERROR|Error" \
            | tail -30
        ;;
    *) echo "unknown part: $part" >&2 ;;
    esac
done
exit 0  # each part's results are in OUT_DIR; a failing grep of an empty log is not a failure
