"""Throughput with tensor parallelism against one rank: ``pagedserve up`` with its defaults and
``--tensor-parallel-size N``, one configuration after another on the same machine.

    python -m pagedserve.benchmarks.tensor_parallel [--workload fixed] [--repeats 2] [--out DIR]

Two models: SmolLM2 itself at 1 and 3 ranks (its 9 query and 3 KV heads divide by 3, not 2),
and a Llama of SmolLM2's depth, width and vocabulary with 8 query and 4 KV heads (head_dim 64)
and random weights at 1 and 2 ranks. On a CPU the ranks share the machine's cores (an equal
share each), so this measures what splitting costs there: all-reduces through gloo and
smaller GEMMs, not more compute. Also times one all-reduce of a decode step's activations
between two processes, through gloo and through shared memory (``--all-reduce-only``: just
that). Prints a table and writes
``tensor_parallel.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedserve.benchmarks.compare import free_ports, request_sets, run_pagedserve
from pagedserve.benchmarks.steps import random_checkpoint
from pagedserve.common.config import default_model_dir
from pagedserve.executor_svc.parallel import TensorParallel

EIGHT_HEADS = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64)


def all_reduce_us(rows: int, hidden: int = 576, reps: int = 300) -> dict[str, float]:
    """Microseconds per all-reduce of ``rows`` x ``hidden`` float32 between two local
    processes of one thread each (what a decode step of ``rows`` sequences does twice per
    layer under TP=2), through gloo and through the ranks' shared memory."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "us.json"
        mp.spawn(_time_all_reduce, args=(free_ports(1)[0], rows, hidden, reps, result),
                 nprocs=2)
        return json.loads(result.read_text())


def _time_all_reduce(rank: int, port: int, rows: int, hidden: int, reps: int,
                     result: Path) -> None:
    torch.set_num_threads(1)
    tp = TensorParallel(rank, 2, f"127.0.0.1:{port}", torch.device("cpu"))
    x = torch.randn(rows, hidden)
    times = {}
    for name, reduce in (("gloo", dist.all_reduce), ("shared memory", tp.all_reduce)):
        for _ in range(20):
            reduce(x)
        start = time.perf_counter()
        for _ in range(reps):
            reduce(x)
        times[name] = (time.perf_counter() - start) / reps * 1e6
    if rank == 0:
        result.write_text(json.dumps(times))
    tp.close()


def run(workload: str, repeats: int, out: Path, device: str = "cpu") -> dict:
    sets = request_sets([workload], repeats, [], 1)
    tokens = sum(len(r["prompt"]) + r["output_len"] for r in sets[workload]["requests"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        eight = random_checkpoint(default_model_dir(), Path(tmp), **EIGHT_HEADS)
        for model, name, sizes in ((default_model_dir(), "SmolLM2 (9/3 heads)", (1, 3)),
                                   (eight, "Llama 8/4 heads, random", (1, 2))):
            for size in sizes:
                label = f"{name} TP={size}"
                print(label, flush=True)
                result = run_pagedserve(
                    sets, free_ports(3), out, str(model),
                    ("--device", device, "--tensor-parallel-size", str(size)),
                    log_name=f"pagedserve-{name.split()[0].lower()}-tp{size}.log")
                wall = result["results"][workload]["median_s"]
                results[label] = {"tp": size, "runs_s": result["results"][workload]["runs_s"],
                                  "total_tok_s": tokens / wall,
                                  "step_ms_p50": result["step_cost"].get("wall_ms_p50")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tensor_parallel"))
    parser.add_argument("--all-reduce-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for rows in (1, 32):
        times = all_reduce_us(rows)
        print(f"all-reduce of {rows} x 576 float32, 2 local processes: "
              + ", ".join(f"{name} {us:.0f} us" for name, us in times.items()))
    if args.all_reduce_only:
        return
    results = run(args.workload, args.repeats, args.out, args.device)
    (args.out / "tensor_parallel.json").write_text(json.dumps(results, indent=1))
    print(f"| configuration | total tok/s ({args.workload}) | step p50 (ms) | vs TP=1 |")
    print("|---|---|---|---|")
    base = {}
    for label, r in results.items():
        model = label.rsplit(" TP=", 1)[0]
        base.setdefault(model, r["total_tok_s"])
        print(f"| {label} | {r['total_tok_s']:.1f} | {r['step_ms_p50']:.1f} | "
              f"{r['total_tok_s'] / base[model]:.2f}× |")


if __name__ == "__main__":
    main()
