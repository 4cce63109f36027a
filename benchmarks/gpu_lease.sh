#!/usr/bin/env bash
# gpu_checks.sh on a lent GPU machine, which starts bare and reaches no package index.
#
#   bash benchmarks/gpu_lease.sh prepare     here, once: into .whl/ the wheels of what the
#                                            machine's image lacks (Python 3.12), into .gpu/
#                                            SmolLM2's config and tokenizer; both git-ignored
#   bash benchmarks/gpu_lease.sh [PART...]   there, from the checkout's root, with .whl and
#                                            .gpu carried: installs the wheels into /tmp/site,
#                                            makes this checkout importable as pagedserve, runs
#                                            gpu_checks.sh's parts (default: all, most wanted
#                                            first) within DEADLINE_S (default 420) and packs
#                                            their results into $OUT/gpu_results.tar.gz
#
# The machine gives back at most 8 files from $OUT, hence the one archive; what the parts
# print is in the command's output too. A lease holds 15 minutes of device time, a machine's
# start included, and one command runs 10 at most: run it with timeout_s about DEADLINE_S +
# 60, then, while the machine is still warm, the parts the deadline skipped (skipped.txt)
# if the time left allows. Tried here with DEVICE=cpu in a Python 3.11 environment holding
# the image's packages (cp311 wheels): the wheels, the import and the deadline work.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=.whl
config=.gpu/smollm2

if [[ ${1:-} == prepare ]]; then
    # The image holds torch, triton, numpy, msgpack, click, jinja2, tokenizers, safetensors,
    # accelerate and prometheus-client; not pyzmq, structlog or gguf, and its transformers has
    # been older than the executor's >= 5.19 (5.24: the last before Hugging Face's `kernels`
    # became a requirement; it checks regex >= 2025.10.22 at import, which the image's may
    # not be).
    grep -qx "/$wheels/" .git/info/exclude 2> /dev/null || printf '/%s/\n/.gpu/\n' "$wheels" \
        >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" \
        pyzmq==27.3.0 structlog==26.1.0 gguf==0.19.0 transformers==5.24.0 regex==2026.11.19 \
        || exit 1
    source=${SMOLLM2_DIR:-$HOME/.cache/pagedserve/models/SmolLM2-135M-Instruct}
    mkdir -p "$config"
    cp "$source"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
        "$config"/ || exit 1
    cp "$source"/chat_template.jinja "$config"/ 2> /dev/null
    du -sh "$wheels" "$config"
    exit 0
fi

out=${OUT:?OUT: the folder whose files come back}
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 1
fi
# pagedserve.common is ./common and so on (pyproject's package-dir): a link named pagedserve
# to the checkout makes it importable without building it
mkdir -p /tmp/shim && ln -sfn "$PWD" /tmp/shim/pagedserve
export PYTHONPATH=/tmp/shim:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
results=/tmp/gpu_results
rm -rf "$results"
DEADLINE_S=${DEADLINE_S:-420} bash benchmarks/gpu_checks.sh "$results" "$config" "$@"
tar -czf "$out/gpu_results.tar.gz" -C "$results" . && ls -la "$out"
