"""Where the executor's time goes: a shared workload through the real engine and model runner in
one process (no sockets), timing every step, optionally with torch's profiler on a few decode
steps.

    python -m benchmarks.steps --workload fixed
    python -m benchmarks.steps --workload mixed --profile-from 120

Prints the median prefill-carrying and pure-decode step times, the total, and (with
``--profile-from N``) the torch operators of 10 decode steps from step N on. Compiled code that
torch does not see (the C decode kernel) shows in the step times, not in the operator table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.workload import WORKLOADS, make_requests
from common import protocol as p
from common.config import default_model_dir
from common.sampling import SamplingParams
from executor_svc.cache_engine import CacheEngine
from executor_svc.cpu import release_free_memory, tune_allocator
from executor_svc.model import load_model
from executor_svc.model_runner import ModelRunner
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.engine import Engine
from scheduler_svc.output_processor import OutputProcessor
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Request
from scheduler_svc.tokenizer import Tokenizer

BLOCK_SIZE, NUM_BLOCKS, PROFILED_STEPS = 16, 4000, 10


def run(workload: str, profile_from: int | None = None) -> dict:
    """Serve ``workload`` as the services would (executor defaults on CPU) and time its steps."""
    tune_allocator()
    model_dir = default_model_dir()
    model = load_model(model_dir, torch.float32, "cpu")
    release_free_memory()
    runner = ModelRunner(model, CacheEngine(model.config, BLOCK_SIZE, NUM_BLOCKS, 0,
                                            torch.float32, "cpu"), BLOCK_SIZE)
    block_manager = BlockManager(BLOCK_SIZE, NUM_BLOCKS, 0)
    engine = Engine(Scheduler(block_manager, 256, 2048),
                    OutputProcessor(Tokenizer.from_model_dir(model_dir), 8192))
    for i, r in enumerate(make_requests(workload)):
        engine.add(Request(str(i), b"bench", SamplingParams(
            temperature=0.0, ignore_eos=True, max_tokens=r.output_len), r.prompt_token_ids,
            stream=False))
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    profiler, table = None, None
    start = time.perf_counter()
    while (scheduled := engine.schedule()) is not None:
        step, plan = scheduled
        kind = "decode" if max(plan.num_tokens, default=1) == 1 else "prefill"
        if (profile_from is not None and profiler is None and table is None
                and kind == "decode" and len(times["decode"]) >= profile_from):
            profiler = torch.profiler.profile()
            profiler.__enter__()
            profiled = 0
        step_start = time.perf_counter()
        result = runner.execute(p.decode(p.encode(plan)))
        times[kind].append(time.perf_counter() - step_start)
        engine.process(step, result)
        if profiler is not None:
            profiled += 1
            if profiled == PROFILED_STEPS:
                profiler.__exit__(None, None, None)
                table = profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                      row_limit=20)
                profiler = None
    return {"workload": workload, "wall_s": time.perf_counter() - start,
            **{f"{kind}_steps": len(ts) for kind, ts in times.items()},
            **{f"{kind}_ms_p50": statistics.median(ts) * 1e3 for kind, ts in times.items()
               if ts},
            "profile": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed")
    parser.add_argument("--profile-from", type=int, default=None,
                        help="Profile 10 decode steps from this decode step on.")
    args = parser.parse_args()
    result = run(args.workload, args.profile_from)
    if result["profile"]:
        print(result["profile"])
    for key, value in result.items():
        if key != "profile":
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
