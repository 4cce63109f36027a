"""Where the executor's time goes: a shared workload through the real engine and model runner in
one process (no sockets), timing every step, optionally with torch's profiler on a few decode
steps.

    python -m pagedserve.benchmarks.steps --workload fixed
    python -m pagedserve.benchmarks.steps --workload mixed --profile-from 120
    python -m pagedserve.benchmarks.steps --workload mixed --breakdown
    python -m pagedserve.benchmarks.steps --workload mixed --kv-cache-dtype bfloat16
    python -m pagedserve.benchmarks.steps --requests 4 --dtype bfloat16   # sweep-4's batch
    python -m pagedserve.benchmarks.steps --requests 4 --dtype bfloat16 --per-op
    python -m pagedserve.benchmarks.steps --device cuda --dtype bfloat16 \
        --attention-backend triton \
        --model CONFIG_DIR --random-weights [--overlap]

Prints the median prefill-carrying and pure-decode step times, the total, the generated tokens
per second, and (with ``--profile-from N``) the torch operators of 10 decode steps from step N
on; on CUDA also the share of those steps' span in which the GPU ran nothing (the union of its
kernels' and copies' intervals against the span from the first's start to the last's end:
what the host's work between steps leaves idle, the profiler's own cost included). Compiled
code that torch does not see (the C kernels) shows in the step times, not in the operator
table; ``--breakdown`` puts timers around each kernel call and each linear layer
instead (by weight shape), and prints where prefill-carrying and pure-decode steps go; it
runs the decoder stack a call per op (the timers sit between the calls), as ``--per-op``
does, where the executor runs it in one call of the same kernels (``FusedDecoder``).
``--random-weights`` builds a checkpoint of the same shape from the model directory's
config.json (and its tokenizer): step times do not depend on the weights' values,
and the workloads ignore EOS, so a machine without the checkpoint measures the same work.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pagedserve.benchmarks.workload import WORKLOADS, WorkloadSpec, make_requests
from pagedserve.common import protocol as p
from pagedserve.common.config import default_model_dir
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc import backends, cpu_kernels
from pagedserve.executor_svc.autotune import Tuner
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.cpu_memory import (bound_primitive_cache, release_free_memory,
                                                tune_allocator)
from pagedserve.executor_svc.layer_ops import PackedLinear
from pagedserve.executor_svc.model import load_model
from pagedserve.executor_svc.model_runner import ModelRunner
from pagedserve.executor_svc.step_pipeline import StepPipeline
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.output_processor import OutputProcessor
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession
from pagedserve.scheduler_svc.tokenizer import Tokenizer

BLOCK_SIZE, NUM_BLOCKS, MAX_NUM_SEQS, PROFILED_STEPS = 16, 4000, 256, 10


def random_checkpoint(model_dir: Path, out: Path, **overrides) -> Path:
    """A checkpoint with ``model_dir``'s config (with ``overrides``) and tokenizer and random
    weights, in ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, **overrides))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


class Breakdown:
    """Wall time of each CPU kernel call and each packed linear layer (by weight shape), per
    kind of step, while installed: timers wrapped around them."""

    KERNELS = ("paged_attention", "rope_write_kv", "add_rms_norm", "silu_mul", "greedy")

    def __init__(self):
        self.kind = "decode"
        self.seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
        self._saved: list[tuple[object, str, object]] = []

    def install(self) -> None:
        for name in self.KERNELS:
            self._wrap(cpu_kernels, name, name)
        forward = PackedLinear.forward

        def timed_forward(layer, x):
            start = time.perf_counter()
            out = forward(layer, x)
            key = (self.kind, f"linear {layer.out_features}x{layer.in_features}")
            self.seconds[key] += time.perf_counter() - start
            return out

        self._saved.append((PackedLinear, "forward", forward))
        PackedLinear.forward = timed_forward

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds[(self.kind, label)] += time.perf_counter() - start
            return out

        self._saved.append((owner, name, original))
        setattr(owner, name, timed)

    def table(self, step_seconds: dict[str, list[float]]) -> str:
        lines = []
        for kind, times in step_seconds.items():
            total = sum(times)
            if not times:
                continue
            lines.append(f"{kind}: {len(times)} steps, {total:.2f} s")
            parts = sorted(((s, part) for (k, part), s in self.seconds.items() if k == kind),
                           reverse=True)
            for seconds, part in parts + [(total - sum(s for s, _ in parts), "(the rest)")]:
                lines.append(f"  {part:24s} {seconds:7.2f} s {100 * seconds / total:5.1f}% "
                             f"{1e3 * seconds / len(times):8.2f} ms/step")
        return "\n".join(lines)


def run(workload: str | WorkloadSpec, profile_from: int | None = None, *,
        model_dir: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
        attention_backend: str = "torch", eager: bool = False, breakdown: bool = False,
        kv_dtype: torch.dtype | None = None, autotune: bool = True,
        per_op: bool = False, overlap: bool = False) -> dict:
    """Serve ``workload`` as the services would (the executor's defaults on CPU: each op
    timed and chosen at load unless ``autotune`` is False) and time its steps; the KV cache
    in ``kv_dtype`` (default: ``dtype``); the decoder stack a call per op with ``per_op`` (or
    ``breakdown``); with ``overlap``, each step after the one in flight is scheduled ahead
    and launched before that one is read back, as the services do on a GPU, and a step's time
    is the time between its result and the one before."""
    kv_dtype = kv_dtype or dtype
    if device == "cpu":  # as the executor sets up
        bound_primitive_cache()
        tune_allocator()
    model_dir = model_dir or default_model_dir()
    load_start = time.perf_counter()
    tuner = Tuner.for_machine() if autotune and torch.device(device).type == "cpu" else None
    model = load_model(model_dir, dtype, device, tuner=tuner)
    load_s = time.perf_counter() - load_start
    release_free_memory()
    runner = ModelRunner(model, CacheEngine(model.config, BLOCK_SIZE, NUM_BLOCKS, 0, kv_dtype,
                                            device), BLOCK_SIZE, attention_backend)
    if per_op or breakdown:
        model.stack = None
    graphs = torch.device(device).type == "cuda" and attention_backend == "triton" and not eager
    if graphs:  # as the executor does by default
        runner.use_decode_graphs(MAX_NUM_SEQS, model.config.max_model_len)
    scheduler = Scheduler(MAX_NUM_SEQS, 2048)
    scheduler.attach(ExecutorSession(BlockManager(BLOCK_SIZE, NUM_BLOCKS, 0),
                                     ContextLimit(8192, "the benchmark serves no more")))
    engine = Engine(scheduler, OutputProcessor(Tokenizer.from_model_dir(model_dir), lambda: 8192))
    for i, r in enumerate(make_requests(workload)):
        engine.add(Request(str(i), b"bench", SamplingParams(
            temperature=0.0, ignore_eos=True, max_tokens=r.output_len), r.prompt_token_ids,
            stream=False))
    generated = sum(r.output_len for r in make_requests(workload))
    timers = Breakdown() if breakdown else None
    if timers:
        timers.install()
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    profiler, table, idle = None, None, None
    steps = StepPipeline(runner, overlap)
    in_flight: collections.deque = collections.deque()  # (step, kind, launched at)
    start = last = time.perf_counter()
    while True:
        if not in_flight:
            scheduled = engine.schedule()
            if scheduled is None:
                break
        else:  # overlapping: the next step goes ahead of the one in flight, if it can
            scheduled = engine.schedule_ahead(in_flight[0][0])
        if scheduled is not None:
            step, plan = scheduled
            kind = "decode" if max(plan.num_tokens, default=1) == 1 else "prefill"
            if (profile_from is not None and profiler is None and table is None
                    and kind == "decode" and len(times["decode"]) >= profile_from):
                profiler = torch.profiler.profile()
                profiler.__enter__()
                profiled = 0
            if timers:
                timers.kind = kind
            in_flight.append((step, kind, time.perf_counter()))
            steps.submit(p.decode(p.encode(plan)))
        if not overlap or scheduled is None:  # else the step it went ahead of is due
            steps.flush()
        for result in steps.take():
            step, kind, launched = in_flight.popleft()
            now = time.perf_counter()
            # a step's time: from its launch, or (overlapping) from the result before it
            times[kind].append(now - (last if overlap else launched))
            last = now
            engine.process(step, result)
            if profiler is not None:
                profiled += 1
                if profiled == PROFILED_STEPS:
                    table, idle = _stop(profiler)
                    profiler = None
    wall = time.perf_counter() - start
    if timers:
        timers.uninstall()
    name = workload if isinstance(workload, str) else f"{workload.num_requests} requests"
    return {"workload": name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "kv_cache_dtype": str(kv_dtype).removeprefix("torch."),
            "attention_backend": attention_backend,
            "kernels": backends.chosen(model, runner.attention, runner.sampler.ops),
            "decode_graphs": graphs, "overlap_steps": overlap,
            "steps_launched_ahead": steps.launched_ahead, "autotune": tuner is not None,
            "load_s": load_s,
            "wall_s": wall,
            "generated_tok_s": generated / wall,
            **{f"{kind}_steps": len(ts) for kind, ts in times.items()},
            **{f"{kind}_ms_p50": statistics.median(ts) * 1e3 for kind, ts in times.items()
               if ts},
            **({"gpu_idle_perc": round(100 * idle[0], 1),
                "gpu_busy_ms_per_step": idle[1] / 1e3 / PROFILED_STEPS} if idle else {}),
            "profile": table, "breakdown": timers.table(times) if timers else None}


def _stop(profiler: torch.profiler.profile) -> tuple[str, tuple[float, float] | None]:
    """End ``profiler``: its operator table, and (on CUDA) ``device_idle`` of its kernels and
    copies."""
    profiler.__exit__(None, None, None)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return table, device_idle([(e.time_range.start, e.time_range.end) for e in profiler.events()
                               if e.device_type == torch.autograd.DeviceType.CUDA])


def device_idle(intervals: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The share of the span of ``intervals`` (start, end) that none of them covers, and the
    length they cover together; None without any."""
    if not intervals:
        return None
    intervals = sorted(intervals)
    busy, reach = 0.0, intervals[0][0]
    for start, end in intervals:  # what each adds past the busy time before it
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = reach - intervals[0][0]
    return (1 - busy / span if span > 0 else 0.0), busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed")
    parser.add_argument("--requests", type=int, default=None,
                        help="This many of the workload's requests, as the concurrency "
                             "sweep of `bench compare` sends fixed's (sweep-4: 4).")
    parser.add_argument("--profile-from", type=int, default=None,
                        help="Profile 10 decode steps from this decode step on.")
    parser.add_argument("--breakdown", action="store_true",
                        help="Time each CPU kernel call and linear layer (CPU only; "
                             "implies --per-op).")
    parser.add_argument("--per-op", action="store_true",
                        help="Run the decoder stack a call per op, not in one call (CPU).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"],
                        help="The KV cache's dtype (auto: --dtype).")
    parser.add_argument("--attention-backend", default="torch", choices=["torch", "triton"])
    parser.add_argument("--enforce-eager", action="store_true",
                        help="No CUDA graphs for decode steps (CUDA with triton attention).")
    parser.add_argument("--overlap", action="store_true",
                        help="Schedule each step ahead of the one in flight and launch it "
                             "before that one is read back (the executor's --overlap-steps); "
                             "a step's time is then the time between results.")
    parser.add_argument("--no-autotune", action="store_true",
                        help="Bind the default ops instead of the fastest measured here.")
    parser.add_argument("--model", type=Path, default=None,
                        help="Model directory (default: the prepared SmolLM2).")
    parser.add_argument("--random-weights", action="store_true",
                        help="Random weights in the shape of --model's config.json.")
    args = parser.parse_args()
    options = dict(device=args.device, dtype=getattr(torch, args.dtype),
                   attention_backend=args.attention_backend, eager=args.enforce_eager,
                   breakdown=args.breakdown, autotune=not args.no_autotune, per_op=args.per_op,
                   overlap=args.overlap,
                   kv_dtype=None if args.kv_cache_dtype == "auto" else torch.bfloat16)
    workload = args.workload if args.requests is None else dataclasses.replace(
        WORKLOADS[args.workload], num_requests=args.requests)
    if args.random_weights:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = random_checkpoint(args.model or default_model_dir(), Path(tmp))
            result = run(workload, args.profile_from, model_dir=model_dir, **options)
    else:
        result = run(workload, args.profile_from, model_dir=args.model, **options)
    for key in ("profile", "breakdown"):
        if result[key]:
            print(result[key])
    for key, value in result.items():
        if key not in ("profile", "breakdown"):
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
