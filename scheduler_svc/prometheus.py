"""Prometheus metrics of the scheduler under vLLM's names, so existing dashboards work.

A private registry (never the global one): latency histograms and token counters are
updated by the step loop; queue gauges, KV usage, preemption and prefix cache counters are
read at scrape time from the loop's latest snapshot, a dict of plain numbers that the HTTP
thread only reads.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's bucket boundaries, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LABELS = ["model_name"]


class PrometheusMetrics:
    """The registry; ``snapshot()`` returns the loop's latest snapshot dict."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.snapshot = snapshot

        def histogram(name, doc, buckets):
            return Histogram(name, doc, LABELS, buckets=buckets,
                             registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time between a request's successive output steps in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "End to end latency of finished requests in seconds.", E2E_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.registry.register(self)

    def collect(self):
        """Gauges and counters read from the snapshot (the registry calls this at scrape)."""
        snap, labels = self.snapshot(), [self.model_name]
        for name, key, doc in (
                ("vllm:num_requests_running", "running", "Requests on the device."),
                ("vllm:num_requests_waiting", "waiting", "Requests waiting to be admitted."),
                ("vllm:num_requests_swapped", "swapped", "Requests swapped out to CPU."),
                ("vllm:kv_cache_usage_perc", "kv_cache_usage",
                 "KV cache usage: fraction of device blocks in use (1 = full).")):
            yield _family(GaugeMetricFamily, name, doc, labels, snap.get(key, 0))
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Preemptions, by kind.",
                                          labels=LABELS + ["kind"])
        for kind, count in snap.get("preemptions", {}).items():
            preemptions.add_metric(labels + [kind], count)
        yield preemptions
        for name, key, doc in (
                ("vllm:prefix_cache_queries", "prefix_cache_queries",
                 "Prompt tokens looked up in the prefix cache."),
                ("vllm:prefix_cache_hits", "prefix_cache_hits",
                 "Prompt tokens found in the prefix cache.")):
            yield _family(CounterMetricFamily, name, doc, labels, snap.get(key, 0))

    def serve(self, host: str, port: int):
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the server
        (``shutdown()`` stops it). Raises ``OSError`` naming the address it could not bind."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on http://{host}:{port}: {exc}") from None
        return server


def _family(kind, name: str, doc: str, labels: list[str], value: float):
    family = kind(name, doc, labels=LABELS)
    family.add_metric(labels, value)
    return family
