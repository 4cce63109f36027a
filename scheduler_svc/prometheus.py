"""Prometheus metrics of the scheduler under vLLM's names, so existing dashboards work.

A private registry (never the global one): latency histograms and token counters are
updated by the step loop; queue gauges, KV usage, preemption and prefix cache counters are
read at scrape time from the loop's latest snapshot, a dict of plain numbers that the HTTP
thread only reads.
"""
from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

# vLLM's bucket boundaries, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LABELS = ["model_name"]


class Histogram:
    """A latency histogram that takes equal observations together (``observe(value,
    count)``): the sequences of a step mostly share one inter-token gap, and a step of 256
    sequences observed one by one through prometheus_client's histogram cost about 0.4 ms.
    The step loop observes, the HTTP thread reads (``family``), under a lock."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.bounds = name, doc, buckets
        self._counts = [0] * (len(buckets) + 1)  # per bucket, the last one past every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        at = bisect.bisect_left(self.bounds, value)  # the first bound >= value: "le"
        with self._lock:
            self._counts[at] += count
            self._sum += value * count

    def family(self, labels: list[str]) -> HistogramMetricFamily:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = list(itertools.accumulate(counts))
        names = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.doc, labels=LABELS)
        family.add_metric(labels, list(zip(names, cumulative)), total)
        return family


class PrometheusMetrics:
    """The registry; ``snapshot()`` returns the loop's latest snapshot dict."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.snapshot = snapshot

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=self.registry).labels(model_name)

        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between a request's successive output steps in seconds.",
                             ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "End to end latency of finished requests in seconds.", E2E_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.registry.register(self)

    def collect(self):
        """The latency histograms, and gauges and counters read from the snapshot (the registry
        calls this at scrape)."""
        snap, labels = self.snapshot(), [self.model_name]
        for histogram in (self.ttft, self.itl, self.e2e):
            yield histogram.family(labels)
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
