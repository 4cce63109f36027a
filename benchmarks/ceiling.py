"""The fastest a request set can run on this machine in float32: its work counted exactly from
the model's config, at the best rate our GEMM reaches here, as total tokens per second; and
that beside the rates a ``bench compare`` measured.

    python -m pagedserve.benchmarks.ceiling \
        --compare benchmarks/results/2026-11-27_compare_final/compare.json

The work is the multiply-adds of the forward passes that serving the set takes (x2 FLOP):
every token fed to the model (a request's prompt, then each output token but its last) goes
through every linear layer; each output token takes one row of the LM head; each fed token's
query heads score and mix its context so far (causal). Norms, RoPE, SiLU and sampling are not
counted, so this is a lower bound on the work and an upper bound on the rate. The rate is the
median of ``benchmarks.cpu_linear``'s pass of SmolLM2's projections through our kernel with
bfloat16 panels (the default path), best over ``--tokens``.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pagedserve.benchmarks.compare import request_sets, throughput
from pagedserve.benchmarks.workload import WORKLOADS
from pagedserve.common.config import default_model_dir


def model_shape(config: dict) -> dict[str, int]:
    """What the count needs of an HF Llama-style ``config.json``."""
    heads = config["num_attention_heads"]
    return {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "inter": config["intermediate_size"], "heads": heads,
            "kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
            "vocab": config["vocab_size"]}


def request_flops(shape: dict[str, int], prompt_len: int, output_len: int) -> dict[str, int]:
    """FLOP (2 per multiply-add) of serving one request, by part: ``linear`` (the layers'
    projections), ``lm_head`` and ``attention`` (scores and values)."""
    fed = prompt_len + output_len - 1  # the last output token is never fed back
    q_width = shape["heads"] * shape["head_dim"]
    kv_width = shape["kv_heads"] * shape["head_dim"]
    per_token = (shape["hidden"] * (q_width + 2 * kv_width) + q_width * shape["hidden"]
                 + 3 * shape["hidden"] * shape["inter"])
    contexts = fed * (fed + 1) // 2  # the token at position p attends to p + 1 tokens
    return {"linear": 2 * per_token * shape["layers"] * fed,
            "lm_head": 2 * shape["hidden"] * shape["vocab"] * output_len,
            "attention": 2 * 2 * q_width * shape["layers"] * contexts}


def set_flops(shape: dict[str, int], requests: list[dict]) -> int:
    return sum(sum(request_flops(shape, len(r["prompt"]), r["output_len"]).values())
               for r in requests)


def best_gemm_rate(tokens: list[int], rounds: int) -> tuple[float, dict[int, float]]:
    """The best FLOP/s of our GEMM (bf16 panels) over ``tokens``, and each count's rate."""
    from pagedserve.benchmarks import cpu_linear
    from pagedserve.executor_svc import cpu_kernels

    if cpu_kernels.load() is None:
        raise SystemExit("the CPU kernels did not build here")
    weights = cpu_linear.smollm2_weights()
    funcs = {"ours": [cpu_kernels.PackedWeight(w, None, True) for w in weights]}
    rates = {}
    for n in tokens:
        times = cpu_linear.measure(funcs, weights, n, rounds)
        rates[n] = times["flops"] / times["ours"]
    return max(rates.values()), rates


def _sets(names: list[str]) -> dict[str, dict]:
    workloads = [n for n in names if n in WORKLOADS]
    sweep = [int(m.group(1)) for n in names if (m := re.fullmatch(r"sweep-(\d+)", n))]
    return request_sets(workloads, 1, sweep, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", type=Path, help="a compare.json to set beside the ceiling")
    parser.add_argument("--sets", default="fixed,mixed",
                        help="request sets (without --compare): fixed, mixed, sweep-N")
    parser.add_argument("--model", type=Path, default=None,
                        help="the model's HF directory (default: pagedserve's default model)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 512, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = json.loads(((args.model or default_model_dir()) / "config.json").read_text())
    shape = model_shape(config)
    measured = json.loads(args.compare.read_text()) if args.compare else None
    names = list(measured["sets"]) if measured else args.sets.split(",")
    sets = _sets(names)
    rate, rates = best_gemm_rate(args.tokens, args.rounds)
    print("our GEMM here: " + ", ".join(f"{r / 1e9:.1f} GFLOP/s at {n} tokens"
                                        for n, r in rates.items()))
    systems = list(measured["results"]) if measured else []
    rates_of = {s: throughput(sets, measured["results"][s]) for s in systems}
    header = ["request set", "TFLOP", "best s", "ceiling tok/s"]
    header += [f"{s} tok/s (of ceiling)" for s in systems]
    header += [f"ceiling / {s}" for s in systems if s != "pagedserve"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, request_set in sets.items():
        tokens = sum(len(r["prompt"]) + r["output_len"] for r in request_set["requests"])
        flops = set_flops(shape, request_set["requests"])
        ceiling = tokens / (flops / rate)
        row = [name, f"{flops / 1e12:.3f}", f"{flops / rate:.2f}", f"{ceiling:.1f}"]
        got = {s: rates_of[s][name] for s in systems if name in rates_of[s]}
        row += [f"{got[s]:.1f} ({got[s] / ceiling:.0%})" if s in got else "-" for s in systems]
        row += [f"{ceiling / got[s]:.2f}x" if s in got else "-"
                for s in systems if s != "pagedserve"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
