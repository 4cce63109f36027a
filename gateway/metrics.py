"""``GET /metrics``: the gateway's own HTTP metrics, and the scheduler's after them.

The gateway counts requests by route and status and times them (to the end of a stream)
in a private registry, beside its process' CPU time and memory
(``pagedserve_gateway_process_*``). The scheduler serves its own metrics
(``--metrics-port``); given its URL, the gateway appends them, so that one scrape of the
HTTP port sees both.
"""
from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

SCRAPE_TIMEOUT_S = 2.0
# Bounds of request durations, in seconds: from a health check to a long generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)


class HTTPMetrics:
    """ASGI middleware counting and timing every HTTP request by method, route and status
    (a path no route matches counts as ``unmatched``, so that scans cannot grow labels)."""

    def __init__(self, app, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("pagedserve_gateway_requests", "HTTP requests answered.",
                                ["method", "route", "status"], registry=registry)
        self.duration = Histogram("pagedserve_gateway_request_duration_seconds",
                                  "HTTP request duration, to the end of its body.",
                                  ["method", "route"], buckets=DURATION_BUCKETS,
                                  registry=registry)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def recording_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.duration.labels(scope["method"], route).observe(time.perf_counter() - start)


async def exposition(registry: CollectorRegistry, scheduler_url: str | None) -> bytes:
    """The registry's metrics in Prometheus' text format, then the scheduler's when
    ``scheduler_url`` is given and answers within ``SCRAPE_TIMEOUT_S``."""
    text = generate_latest(registry)
    if scheduler_url is None:
        return text
    try:
        return text + await asyncio.to_thread(_fetch, scheduler_url)
    except (OSError, urllib.error.URLError):
        return text + f"# the scheduler's metrics at {scheduler_url} did not answer\n".encode()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return response.read()
