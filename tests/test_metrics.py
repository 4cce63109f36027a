"""Request latencies: time to first token and inter-token latency, per sequence."""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.metrics import Metrics
from pagedserve.scheduler_svc.prometheus import PrometheusMetrics
from pagedserve.scheduler_svc.sequence import Request, Sequence


def _request(n: int) -> Request:
    request = Request("r", b"client", SamplingParams(n=n), [1, 2, 3], stream=True,
                      arrival_time=0.0)
    request.seqs = [Sequence(i, request.prompt_token_ids, request, sample_index=i)
                    for i in range(n)]
    return request


def _step(metrics: Metrics, request: Request, now: float, *samples: int) -> None:
    """Each of ``samples`` (sample indices) gets one token at ``now``."""
    for i in samples:
        request.seqs[i].append_token(7, -0.5)
    metrics.observe([request], now)


def test_forks_first_tokens_after_sample_0s_are_not_inter_token_time():
    metrics, request = Metrics("m"), _request(n=3)
    _step(metrics, request, 1.0, 0)        # sample 0's first token
    _step(metrics, request, 5.0, 1, 2)     # the forks' first tokens, much later
    assert list(metrics.ttft) == [1.0] and list(metrics.itl) == []
    _step(metrics, request, 5.5, 0, 1, 2)  # each sample's next token
    assert list(metrics.itl) == pytest.approx([4.5, 0.5, 0.5])  # each since its own last
    assert metrics.generation_tokens == 6


def test_one_sample_records_each_gap_between_its_tokens():
    metrics, request = Metrics("m"), _request(n=1)
    for now in (0.25, 0.5, 1.0, 1.75):
        _step(metrics, request, now, 0)
    assert list(metrics.ttft) == [0.25]
    assert list(metrics.itl) == pytest.approx([0.25, 0.5, 0.75])


def test_a_step_without_new_tokens_records_nothing():
    metrics, request = Metrics("m"), _request(n=2)
    _step(metrics, request, 1.0, 0, 1)
    _step(metrics, request, 2.0)
    assert (list(metrics.ttft), list(metrics.itl), metrics.generation_tokens) == ([1.0], [], 2)


def test_a_beam_forked_mid_output_records_no_gap_at_its_first_token():
    metrics, request = Metrics("m"), _request(n=1)
    _step(metrics, request, 1.0, 0)
    _step(metrics, request, 2.0, 0)
    request.seqs.append(request.seqs[0].fork(1))  # copies the output so far, not its timing
    _step(metrics, request, 4.0, 1)
    assert list(metrics.itl) == pytest.approx([1.0])
    _step(metrics, request, 4.5, 0, 1)
    assert list(metrics.itl) == pytest.approx([1.0, 2.5, 0.5])


def test_histograms_count_equal_observations_together_in_le_buckets():
    prometheus = PrometheusMetrics("m", dict)
    prometheus.itl.observe(0.02, 3)
    prometheus.itl.observe(0.3)  # on a bound: counted in its bucket ("le")
    prometheus.itl.observe(100.0)  # past every bound
    text = generate_latest(prometheus.registry).decode()
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "vllm:inter_token_latency_seconds")
    samples = {(s.name.rsplit("_", 1)[-1], s.labels.get("le")): s.value for s in family.samples}
    assert samples["bucket", "0.01"] == 0 and samples["bucket", "0.025"] == 3
    assert samples["bucket", "0.2"] == 3 and samples["bucket", "0.3"] == 4
    assert samples["bucket", "80.0"] == 4 and samples["bucket", "+Inf"] == 5
    assert samples["count", None] == 5
    assert samples["sum", None] == pytest.approx(0.06 + 0.3 + 100.0)
