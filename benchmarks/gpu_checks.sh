#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run that fits a short lease of a GPU machine:
#   kernel-tests  the kernel tests (attention, block copies, layer ops), against references
#   tests    the engine's CUDA-only tests: swaps, copy-on-write (one kernel launch each, the
#            swap pool addressed in place) and decode graphs on the GPU
#   kernels  python -m pagedserve.benchmarks.kernels (paged decode/prefill vs SDPA, block copies, swaps)
#   steps    python -m pagedserve.benchmarks.steps on the shared workloads, bf16, with decode graphs, with
#            --enforce-eager, and with the torch backend; 32 sequences with graphs, steps
#            overlapped (--overlap) and not; then 10 graph-replayed decode steps under torch's
#            profiler (host and GPU time per operator, in steps.txt)
#   serve    pagedserve up on the GPU, then bench throughput on both workloads (and the step
#            cost from stats): with the defaults, --overlap-steps off, --no-async-scheduling
#            and --enforce-eager
# Steps and serve use SmolLM2's shape with random weights: step times do not depend on the
# weights' values, and the workloads ignore EOS.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR CONFIG_DIR [PART...]     (default: every part)
#
# CONFIG_DIR holds SmolLM2's config.json and tokenizer files (no weights needed). Each part has
# its own time limits, so that one slow part still leaves the others' results in OUT_DIR.
set -uo pipefail
out=${1:?OUT_DIR}
config=${2:?CONFIG_DIR}
shift 2
parts=${*:-kernel-tests tests kernels steps serve}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu tries the script out on a machine without a GPU
model=/tmp/pagedserve-random-smollm2

nvidia-smi -L
"$py" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__, '|', \
torch.cuda.get_device_name())"
if [[ $parts == *steps* || $parts == *serve* ]] && [[ ! -d $model ]]; then
    "$py" -c "import sys; from pathlib import Path; from pagedserve.benchmarks.steps import random_checkpoint
random_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))" "$config" "$model" 2>&1 | grep -v Writing
fi

if [[ $parts == *kernel-tests* ]]; then
    echo "== kernel tests on the GPU"
    timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py \
        tests/test_kernels_prefill.py tests/test_kernels_layer_ops.py 2>&1 | tee "$out/kernel-tests.log" \
        | grep -E "passed|failed|error|FAILED|ERROR|Error" | tail -30
fi

if [[ " $parts " == *" tests "* ]]; then
    echo "== engine tests on the GPU"
    timeout 90 "$py" -m pytest -q -p no:cacheprovider tests/test_engine.py \
        tests/test_triton_backend.py tests/test_block_ops.py -k "cuda or graphs" -m "not slow" 2>&1 \
        | tee "$out/tests.log" | grep -E "passed|failed|error|FAILED|ERROR|Error" | tail -30
fi

if [[ $parts == *kernels* ]]; then
    echo "== kernel benchmark"
    timeout 150 "$py" -m pagedserve.benchmarks.kernels --json > "$out/kernels.json" 2> "$out/kernels.err"
    echo "rc=$?"; tail -3 "$out/kernels.err"
fi

if [[ $parts == *steps* ]]; then
    echo "== engine steps in process"
    for run in "fixed triton" "fixed triton --enforce-eager" "mixed triton" "fixed torch" \
            "fixed triton --requests=32" "fixed triton --requests=32 --overlap" \
            "mixed triton --overlap" "fixed triton --profile-from=20 --overlap"; do
        set -- $run
        timeout 90 "$py" -m pagedserve.benchmarks.steps --workload "$1" --attention-backend "$2" ${@:3} \
            --device "$device" --dtype bfloat16 --model "$model" 2>&1 \
            | tee -a "$out/steps.txt" | grep -E "workload|backend|graphs|overlap|ahead|tok_s|ms_p50|Error"
    done
fi

if [[ $parts == *serve* ]]; then
    echo "== pagedserve up on the GPU, bench throughput"
    # the defaults (decode graphs, async scheduling, overlapping steps), then each turned off
    for flags in --defaults "--overlap-steps off" --no-async-scheduling --enforce-eager; do
        [[ $flags == --defaults ]] && set -- || set -- $flags
        name=${flags// /}
        "$py" -m pagedserve.common.cli up --device "$device" --model "$model" "$@" --ready-timeout 150 \
            > "$out/up$name.log" 2>&1 &
        up=$!
        for _ in $(seq 150); do
            grep -q "pagedserve ready" "$out/up$name.log" && break
            kill -0 $up 2> /dev/null || break
            sleep 1
        done
        for workload in fixed mixed; do
            echo "$flags $workload"
            timeout 60 "$py" -m pagedserve.common.cli bench throughput --workload $workload --json 2>&1 \
                | tee -a "$out/serve.jsonl" | tail -2
            "$py" -m pagedserve.common.cli stats --json 2>&1 | "$py" -c \
                "import json, sys; print(json.dumps(json.load(sys.stdin)['step_cost']))" \
                | tee -a "$out/serve.jsonl"
        done
        kill -INT $up; wait $up || true
        grep -E "graphs captured|Error|error" "$out/up$name.log" | tail -5
    done
fi
exit 0  # each part's results are in OUT_DIR; a failing grep of an empty log is not a failure
