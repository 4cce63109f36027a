"""The operator surface against real processes: a 12-block device pool, a request A and a
later n=2 request B that outgrow it together, so B (the latest arrival, a group) is swapped
out exactly once; the admin views, /metrics, the status log and ``pool --watch`` must show
what happened."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from services import Services, free_ports, pagedserve

from pagedserve.common.client import Client
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.cpu_features import cpu_info

pytestmark = pytest.mark.slow

BLOCK = 16
PROMPT_A = list(range(1000, 1040))   # 40 tokens: 2 full blocks + 8
PROMPT_B = list(range(2000, 2020))   # 20 tokens: 1 full block + 4, shared by both samples
PROMPT_P = list(range(3000, 3040))
# A alone grows to 190 tokens (12 blocks: the whole pool); B alone to 2 x 80 tokens
# (1 shared + 2 x 4 private blocks); together they do not fit.
PARAMS_A = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=150)
PARAMS_B = SamplingParams(n=2, temperature=0.0, ignore_eos=True, max_tokens=60)
METRIC_NAMES = {"vllm:num_requests_running", "vllm:num_requests_waiting",
                "vllm:num_requests_swapped", "vllm:kv_cache_usage_perc",
                "vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens",
                "vllm:generation_tokens"}


@pytest.fixture(scope="module")
def run(smollm2_dir, tmp_path_factory):
    """Start the services, run A and B, and record what the views showed on the way."""
    (metrics_port,) = free_ports(1)
    log_path = tmp_path_factory.mktemp("log") / "scheduler.log"
    with open(log_path, "w") as log:
        services = Services(smollm2_dir, scheduler_args=[
            "--metrics-port", str(metrics_port), "--log-format", "json",
            "--log-stats-interval", "0.5", "--preemption-mode", "auto"],
            executor_args=["--num-device-blocks", "12", "--num-cpu-blocks", "64"],
            scheduler_stderr=log)
    seen = {"metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "log": log_path,
            "services": services, "initial_pool": services.pool()}
    try:
        outputs = {}
        a = _generate(services, "A", PROMPT_A, PARAMS_A, outputs)
        _wait_for(services, lambda seqs: any(s["num_computed_tokens"] >= len(PROMPT_A)
                                             for s in seqs))
        b = _generate(services, "B", PROMPT_B, PARAMS_B, outputs)
        seen["pair"] = _consistent_read(services, lambda seqs: len(
            [s for s in seqs if s["status"] == "running"
             and s["num_tokens"] > len(PROMPT_B) + 1]) >= 2 and len(seqs) == 3)
        seen["seq"] = services.admin_cmd("seq", seq_id=seen["pair"][0][-1]["seq_id"])
        seen["scrape"] = urllib.request.urlopen(seen["metrics_url"], timeout=5).read().decode()
        seen["watch"] = _watch(services)
        a.join(120)
        b.join(120)
        seen["outputs"] = outputs
        seen["after_ab"] = services.pool()
        for tokens in (2, 2):  # the second P finds P's full blocks cached
            _generate(services, "P", PROMPT_P, SamplingParams(
                temperature=0.0, ignore_eos=True, max_tokens=tokens), outputs).join(60)
            seen.setdefault("after_p", []).append(services.pool())
        seen["final_pool"] = services.pool()
        seen["stats"] = services.admin_cmd("stats")
        seen["final_scrape"] = urllib.request.urlopen(seen["metrics_url"], timeout=5).read() \
            .decode()
        yield seen
    finally:
        services.stop()


def _generate(services, name, prompt, params, outputs) -> threading.Thread:
    def target():
        with Client(services.client, timeout=120.0) as client:
            outputs[name] = client.generate(prompt, params)
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _wait_for(services, condition, timeout_s=60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seqs = services.admin_cmd("seqs")["seqs"]
        if condition(seqs):
            return seqs
        time.sleep(0.01)
    raise TimeoutError("the sequences never reached the expected state")


def _consistent_read(services, condition) -> tuple[list[dict], dict]:
    """seqs, pool, seqs until both seqs replies agree: no step changed the pool between."""
    for _ in range(200):
        before = _wait_for(services, condition)
        pool = services.pool()
        if services.admin_cmd("seqs")["seqs"] == before:
            return before, pool
    raise TimeoutError("no two admin reads without a step between")


def _watch(services) -> bytes:
    """``pagedserve pool --watch`` in a pseudo-terminal for about a second, then SIGINT."""
    main, child = pty.openpty()
    proc = pagedserve("pool", "--watch", "--interval", "0.2", "--admin", services.admin,
                      stdin=child, stdout=child, stderr=child)
    os.close(child)
    out = b""
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline or out.count(b"\x1b[H") < 3:
        if time.monotonic() > deadline + 30:
            break
        if select.select([main], [], [], 0.1)[0]:
            out += os.read(main, 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    os.close(main)
    return out


def _metrics(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(families: dict, name: str, suffix: str = "", **labels) -> float:
    return next(s.value for s in families[name].samples if s.name == name + suffix
                and all(s.labels.get(k) == v for k, v in labels.items()))


def test_pool_starts_all_free_with_the_handshake_sizes(run):
    pool = run["initial_pool"]
    assert pool["device"] == {"total": 12, "free": 12, "used": 0, "cached": 0, "shared": 0,
                              "refcounts": {}}
    assert pool["cpu"]["total"] == 64 and pool["cpu"]["used"] == 0
    assert pool["map"] == {"device": "." * 12, "cpu": "." * 64}



def test_health_names_the_processor_and_the_kernel_each_op_runs_on(run):
    executor = run["services"].admin_cmd("health")["executor"]
    kernels = executor["kernels"]
    assert executor["device"] == "cpu" and kernels["cpu"] == cpu_info().describe()
    # Attention: our kernels where they built. Each other op: what the start-up timing chose
    # between our kernels and torch's (a linear layer per shape and bucket of rows).
    assert kernels["attention"] == ("cpu" if cpu_kernels.load() is not None else "torch")
    assert {kernels[op] for op in ("add_rms_norm", "silu_mul", "greedy")} <= {"cpu", "torch"}
    linear = set(re.findall(r"[a-z]+", re.sub(r"\d+x\d+|rows", "", kernels["linear"])))
    assert linear and linear <= {"cpu", "onednn", "torch"}, kernels["linear"]
    assert kernels["cpu_kernels"] == cpu_kernels.describe()  # the build, or why none serves
    assert kernels["dtype"].startswith(("float32 (auto", "bfloat16 (auto"))
    assert kernels["block_ops"] == "a strided copy per block"  # one path for every block op


def test_samples_share_their_prompt_block_while_they_run(run):
    seqs, pool = run["pair"]
    by_request = {}
    for seq in seqs:
        by_request.setdefault(seq["request_id"], []).append(seq)
    (pair,) = [group for group in by_request.values() if len(group) == 2]
    assert pair[-1] == seqs[-1]  # the seq view below is of one of B's samples
    # Blocks per sequence: one per 16 tokens. The newest token may await its slot, and a
    # step planned ahead (async scheduling) holds the slot of a token not yet sampled.
    for seq in seqs:
        assert seq["num_blocks"] in {-(-(seq["num_tokens"] + d) // BLOCK) for d in (-1, 0, 1)}
    # B's first block is held by both samples; everything else by one sequence.
    assert pool["device"]["shared"] == 1 and pool["device"]["refcounts"]["2"] == 1
    distinct = sum(s["num_blocks"] for s in seqs) - 1
    assert pool["device"]["used"] == distinct == pool["device"]["refcounts"]["1"] + 1
    assert pool["device"]["free"] + pool["device"]["used"] == 12
    tokens = sum(min(s["num_tokens"], BLOCK * s["num_blocks"]) for s in seqs) - BLOCK
    assert pool["slots"] == {"used": tokens, "allocated": BLOCK * distinct}
    assert pool["map"]["device"].count("s") == 1
    assert pool["map"]["device"].count("u") == distinct - 1
    assert pool["running"] == 2 and pool["waiting"] == 0
    # Read a moment later: B may have been swapped out since, keeping its sharing.
    seq = run["seq"]
    assert seq["request_id"] == pair[-1]["request_id"] and seq["blocks"][0]["refcount"] == 2
    assert all(b["refcount"] == 1 for b in seq["blocks"][1:])
    assert [b["fill"] for b in seq["blocks"][:-1]] == [BLOCK] * (len(seq["blocks"]) - 1)


def test_the_later_group_is_swapped_out_once_and_everything_completes(run):
    outputs = run["outputs"]
    assert len(outputs["A"].outputs[0].token_ids) == 150
    assert [len(o.token_ids) for o in outputs["B"].outputs] == [60, 60]
    pool = run["after_ab"]
    assert pool["preemptions"] == {"swap": 1, "recompute": 0}
    assert pool["prefix_cache"] == {"queries": 60, "hits": 0}


def test_the_pools_are_free_or_cached_when_every_request_has_ended(run):
    for pool in (run["after_ab"], run["final_pool"]):
        for name in ("device", "cpu"):
            counts = pool[name]
            assert counts["used"] == 0 and counts["free"] == counts["total"]
            assert counts["shared"] == 0 and counts["refcounts"] == {}
        assert set(pool["map"]["device"]) <= {".", "c"} and set(pool["map"]["cpu"]) == {"."}
        assert pool["map"]["device"].count("c") == pool["device"]["cached"]
        assert pool["slots"] == {"used": 0, "allocated": 0}
        assert pool["running"] == pool["waiting"] == pool["swapped"] == 0


def test_a_repeated_prompt_hits_its_full_blocks_in_the_prefix_cache(run):
    first, second = run["after_p"]
    assert first["prefix_cache"] == {"queries": 100, "hits": 0}
    # 40 tokens: the 2 full blocks hit (the last prompt token is always computed).
    assert second["prefix_cache"] == {"queries": 140, "hits": 32}
    assert second["device"]["cached"] >= 2


def test_stats_count_every_request_and_token(run):
    stats = run["stats"]
    assert stats["requests_finished"] == 4
    assert stats["tokens"] == {"prompt": 140, "generation": 150 + 120 + 2 + 2}
    assert stats["ttft_s"]["count"] == 4 and stats["e2e_s"]["count"] == 4
    assert 0 < stats["ttft_s"]["p50"] <= stats["ttft_s"]["p90"] <= stats["ttft_s"]["p99"]
    assert 0 < stats["itl_s"]["p50"] <= stats["itl_s"]["p99"] < stats["e2e_s"]["p99"]
    assert stats["queues"] == {"running": 0, "waiting": 0, "swapped": 0}
    cost = stats["step_cost"]
    assert cost["steps"] > 0 and cost["wall_ms_p50"] > cost["outside_forward_ms_p50"] > 0
    assert 0 < cost["outside_forward_perc"] < 100
    # async scheduling is on by default: the long decodes went ahead, prompt steps did not
    assert 0 < cost["ahead_perc"] < 100


def test_metrics_scraped_under_load_carry_vllm_names(run):
    families = _metrics(run["scrape"])
    assert METRIC_NAMES <= set(families)
    assert _sample(families, "vllm:num_requests_running") == 2
    assert 0 < _sample(families, "vllm:kv_cache_usage_perc") <= 1
    final = _metrics(run["final_scrape"])
    assert _sample(final, "vllm:num_preemptions", "_total", kind="swap") == 1
    assert _sample(final, "vllm:generation_tokens", "_total") == 274
    assert _sample(final, "vllm:prompt_tokens", "_total") == 140
    assert _sample(final, "vllm:prefix_cache_hits", "_total") == 32
    assert _sample(final, "vllm:e2e_request_latency_seconds", "_count") == 4
    assert _sample(final, "vllm:num_requests_running") == 0


def test_status_lines_and_request_lines_carry_their_context(run):
    lines = [json.loads(line) for line in run["log"].read_text().splitlines()
             if line.startswith("{")]
    status = [line for line in lines if line["event"] == "status"]
    assert status, "no periodic status line while busy"
    assert {"prompt_tokens_per_s", "generation_tokens_per_s", "running", "waiting", "swapped",
            "kv_cache_usage_perc", "prefix_cache_hit_rate_perc", "step"} <= set(status[0])
    assert any(line["generation_tokens_per_s"] > 0 for line in status)


def test_pool_watch_draws_the_map_in_a_terminal_and_redraws_until_sigint(run):
    out = run["watch"].decode(errors="replace")
    assert out.count("\x1b[H") >= 3  # drawn, then redrawn in place at least twice
    assert "\x1b[32m#\x1b[0m" in out  # a used block, in colour on a terminal
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert plain.count("device map:") >= 3 and "1 cell = 1 block" in plain
    assert "# used  @ shared  ~ swapped" in plain
