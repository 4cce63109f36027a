"""Request timings and token throughput: ``pagedserve stats``, the Prometheus metrics and
the periodic status log line all read these records.

Only the step loop's thread records and reads them, except ``snapshot``: a dict of plain
numbers that the loop replaces whole and the Prometheus HTTP thread only reads.
"""
from __future__ import annotations

import itertools
import time
from collections import deque

from pagedserve.scheduler_svc.prometheus import PrometheusMetrics
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request

WINDOW = 10_000     # latest latencies kept for percentiles
HISTORY_S = 60.0    # token totals kept this long, for throughput over a recent window
PERCENTILES = (50, 90, 99)


def percentile(values, q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, interpolated linearly between the
    closest ranks (numpy's default); None when there are no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values) -> dict:
    """Count and p50/p90/p99 of latencies in seconds."""
    return {"count": len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


class Metrics:
    """Per-request latencies (TTFT, inter-token, end to end) and token counts, fed with the
    requests each step touched."""

    def __init__(self, model_name: str):
        self.ttft: deque[float] = deque(maxlen=WINDOW)
        self.itl: deque[float] = deque(maxlen=WINDOW)
        self.e2e: deque[float] = deque(maxlen=WINDOW)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_finished = 0
        self.start_time = time.monotonic()
        # (time, prompt_tokens, generation_tokens) after each observed step, oldest first.
        self._history: deque[tuple[float, int, int]] = deque()
        self.snapshot: dict = {}
        self.prometheus = PrometheusMetrics(model_name, lambda: self.snapshot)
        # (step wall ms, forward ms, sequences) of recent steps: the cost around the model.
        self.steps: deque[tuple[float, float, int, bool]] = deque(maxlen=WINDOW)

    def observe_step(self, wall_ms: float, forward_ms: float, num_seqs: int,
                     ahead: bool = False) -> None:
        """One step from the start of scheduling it (or, when it was sent ahead, from the
        end of the step before) to the end of processing its result, and the executor's
        forward pass (model, logits, sampling) within it."""
        self.steps.append((wall_ms, forward_ms, num_seqs, ahead))

    def step_cost(self) -> dict:
        """Recent steps' wall time and the share of it outside the forward pass: scheduling,
        encoding, the round trip, the executor's table updates and block ops, processing."""
        if not self.steps:
            return {"steps": 0}
        walls, forwards, seqs, ahead = zip(*self.steps)
        outside = sum(walls) - sum(forwards)
        return {"steps": len(walls), "wall_ms_p50": percentile(walls, 50),
                "outside_forward_ms_p50": percentile([w - f for w, f, *_ in self.steps], 50),
                "outside_forward_perc": round(100 * outside / sum(walls), 2),
                "seqs_p50": percentile(seqs, 50),
                "ahead_perc": round(100 * sum(ahead) / len(ahead), 2)}

    def observe(self, requests: list[Request], now: float) -> None:
        """Record the output the last step gave ``requests``."""
        prompt_tokens, generation_tokens = self.prompt_tokens, self.generation_tokens
        gaps: dict[float, int] = {}  # this step's inter-token gaps, equal ones counted together
        for request in requests:
            self._observe_tokens(request, now, gaps)
            if request.is_finished:
                self.num_finished += 1
                self._record(self.e2e, self.prometheus.e2e, now - request.arrival_time)
        for gap, count in gaps.items():
            self.itl.extend(itertools.repeat(gap, count))
            self.prometheus.itl.observe(gap, count)
        if self.prompt_tokens > prompt_tokens:
            self.prometheus.prompt_tokens.inc(self.prompt_tokens - prompt_tokens)
        if self.generation_tokens > generation_tokens:
            self.prometheus.generation_tokens.inc(self.generation_tokens - generation_tokens)
        self._history.append((now, self.prompt_tokens, self.generation_tokens))
        while self._history and self._history[0][0] < now - HISTORY_S:
            self._history.popleft()

    def _observe_tokens(self, request: Request, now: float, gaps: dict[float, int]) -> None:
        seqs = request.seqs
        generated = (seqs[0].num_output_tokens if len(seqs) == 1 else
                     sum(seq.num_output_tokens for seq in seqs))
        new = generated - request.num_generated
        if new <= 0:
            return
        if request.first_token_time is None:
            request.first_token_time = now
            self._record(self.ttft, self.prometheus.ttft, now - request.arrival_time)
            self.prompt_tokens += len(request.prompt_token_ids)
        self._observe_gaps(request, now, gaps)
        request.num_generated = generated
        self.generation_tokens += new

    @staticmethod
    def _observe_gaps(request: Request, now: float, gaps: dict[float, int]) -> None:
        """Inter-token latency: for each sequence with a new token, the time since its own
        previous one. A sequence's first token ends no gap: the wait for a forked sample's
        first token (n > 1) is not inter-token time. (A beam forked from another starts
        here afresh too; the beam it was forked from goes on, and records the step.)"""
        for seq in request.seqs:
            if seq.num_output_tokens > seq.num_observed_tokens:
                if seq.last_token_time is not None:
                    gap = now - seq.last_token_time
                    gaps[gap] = gaps.get(gap, 0) + 1
                seq.num_observed_tokens, seq.last_token_time = seq.num_output_tokens, now

    @staticmethod
    def _record(window: deque, histogram, seconds: float) -> None:
        window.append(seconds)
        histogram.observe(seconds)

    def throughput(self, window_s: float, now: float) -> dict:
        """Prompt and generated tokens per second over the last ``window_s`` seconds."""
        base_time, base_prompt, base_generation = self.start_time, 0, 0
        for entry in self._history:
            if entry[0] > now - window_s:
                break
            base_time, base_prompt, base_generation = entry
        elapsed = max(now - base_time, 1e-9)
        return {"window_s": round(min(elapsed, window_s), 3),
                "prompt_tokens_per_s": (self.prompt_tokens - base_prompt) / elapsed,
                "generation_tokens_per_s": (self.generation_tokens - base_generation) / elapsed}

    def stats(self, now: float, window_s: float = 10.0) -> dict:
        """The ``pagedserve stats`` view (queue lengths come from the snapshot)."""
        return {"uptime_s": now - self.start_time,
                "throughput": self.throughput(window_s, now),
                "queues": {key: self.snapshot.get(key, 0)
                           for key in ("running", "waiting", "swapped")},
                "requests_finished": self.num_finished,
                "tokens": {"prompt": self.prompt_tokens, "generation": self.generation_tokens},
                "ttft_s": summary(self.ttft), "itl_s": summary(self.itl),
                "e2e_s": summary(self.e2e), "step_cost": self.step_cost()}

    def refresh(self, scheduler: Scheduler) -> None:
        """Take a new snapshot of the queues and pools, as one assignment, so the Prometheus
        thread never sees a half-updated one."""
        self.snapshot = {
            **scheduler.queue_lengths(),
            "kv_cache_usage": scheduler.kv_cache_usage,
            "preemptions": dict(scheduler.preemptions),
            "prefix_cache_queries": scheduler.prefix_cache_stats["queries"],
            "prefix_cache_hits": scheduler.prefix_cache_stats["hits"]}

    def status(self, window_s: float, now: float) -> dict:
        """The periodic status line: throughput over the last ``window_s``, queues, KV cache
        usage and prefix cache hit rate (of all prompt tokens looked up so far), as vLLM logs."""
        rates = self.throughput(window_s, now)
        snap = self.snapshot
        queries = snap.get("prefix_cache_queries", 0)
        return {"prompt_tokens_per_s": round(rates["prompt_tokens_per_s"], 1),
                "generation_tokens_per_s": round(rates["generation_tokens_per_s"], 1),
                **{key: snap.get(key, 0) for key in ("running", "waiting", "swapped")},
                "kv_cache_usage_perc": round(100 * snap.get("kv_cache_usage", 0.0), 1),
                "prefix_cache_hit_rate_perc": round(
                    100 * snap.get("prefix_cache_hits", 0) / queries, 1) if queries else 0.0}
