"""What the gateway adds to one request's time to first token, apart from the scheduler's step.

    python -m pagedserve.benchmarks.gateway_latency --requests 400

A stand-in scheduler (a process of its own, speaking the client protocol of
``common/protocol.py``) answers each generation at once: its first token, then its end. In
front of it the gateway runs in its own process, as ``pagedserve gateway`` does. The two
paths alternate, one request at a time, ``--requests`` each:

- ``zeromq``: the ZeroMQ ``AsyncClient`` straight to the stand-in, request to first output
  (the quickest client path, so that the difference bounds the gateway's cost from above);
- ``http``: a streamed ``POST /v1/completions`` on a raw socket (``TCP_NODELAY``; no HTTP
  library's own cost), from the request's first byte to the first event's.

On the real server the time to first token also holds the wait for the scheduler's next step
(up to a whole step, ~8 ms of spread for one request here), which hides a 1 ms difference;
against the stand-in only the paths' own costs differ. The difference of the medians is what
the gateway adds (issue 23's budget: 1 ms).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import zmq

from pagedserve.common import protocol as p
from pagedserve.common.client import AsyncClient
from pagedserve.common.sampling import SamplingParams
from pagedserve.common.up import http_ready, stop_processes, wait_until

MODEL = "stand-in"


def stand_in(address: str) -> None:
    """Answer model-info requests, and every generation with one token, then its end, until
    terminated."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    try:
        while True:
            client, payload = sock.recv_multipart()
            msg = p.decode(payload)
            if isinstance(msg, p.ModelInfoRequest):
                replies = [p.ModelInfo(msg.request_id, MODEL, 2048, True, 49152, None, {},
                                       False)]
            elif isinstance(msg, p.GenerateRequest):
                first = p.CompletionDelta(0, " a", np.array([5], np.int32), -0.1)
                last = p.CompletionDelta(0, "", np.zeros(0, np.int32), -0.1, "length")
                replies = [p.RequestOutputMsg(msg.request_id, [first], False,
                                              np.array([1, 2], np.int32), "Hello"),
                           p.RequestOutputMsg(msg.request_id, [last], True)]
            else:  # an abort: nothing is running
                continue
            for reply in replies:
                sock.send_multipart([client, p.encode(reply)])
    finally:
        sock.close()


def http_ttft(port: int, body: bytes) -> float:
    """Seconds from a streamed completion's first byte sent to its first event's arrival."""
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        conn.sendall(request)
        received = b""
        while b"data:" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                raise RuntimeError(f"the gateway closed the connection: {received[:200]!r}")
            received += chunk
        elapsed = time.perf_counter() - start
        if not received.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the gateway answered {received[:200]!r}")
        return elapsed


async def zeromq_ttft(client: AsyncClient, params: SamplingParams) -> float:
    start = time.perf_counter()
    stream = client.stream([1, 2], params)
    await anext(stream)
    elapsed = time.perf_counter() - start
    async for _ in stream:  # to its end, so that the next request starts on a quiet link
        pass
    return elapsed


async def alternate(args, address: str) -> dict[str, list[float]]:
    """Each path's times to first token, the paths taking turns."""
    body = json.dumps({"prompt": [1, 2], "max_tokens": 2, "stream": True}).encode()
    params = SamplingParams(max_tokens=2)
    times: dict[str, list[float]] = {"zeromq": [], "http": []}
    client = AsyncClient(address)
    try:
        for i in range(args.warmup + args.requests):
            for path in times:
                took = (await zeromq_ttft(client, params) if path == "zeromq"
                        else http_ttft(args.http_port, body))
                if i >= args.warmup:
                    times[path].append(took)
                await asyncio.sleep(args.pause_ms / 1e3)
    finally:
        await client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per path")
    parser.add_argument("--warmup", type=int, default=50, help="per path, not counted")
    parser.add_argument("--scheduler-port", type=int, default=5599)
    parser.add_argument("--http-port", type=int, default=8099)
    parser.add_argument("--pause-ms", type=float, default=2.0,
                        help="between requests, as between a client's unrelated requests")
    args = parser.parse_args()
    address = f"tcp://127.0.0.1:{args.scheduler_port}"
    scheduler = multiprocessing.Process(target=stand_in, args=(address,), daemon=True)
    scheduler.start()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.common.cli", "gateway", "--server", address,
         "--port", str(args.http_port)],
        env={k: v for k, v in os.environ.items() if k != "PAGEDSERVE_API_KEY"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        health = f"http://127.0.0.1:{args.http_port}/health"
        wait_until(lambda: http_ready(health), [gateway], "the gateway", 30.0)
        times = asyncio.run(alternate(args, address))
    finally:
        stop_processes([gateway])
        scheduler.terminate()
    medians = {path: statistics.median(ts) for path, ts in times.items()}
    for path, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        print(f"{path:7s} time to first token: median {medians[path] * 1e3:.3f} ms, "
              f"p10 {q[0] * 1e3:.3f}, p90 {q[-1] * 1e3:.3f} ({len(ts)} requests)")
    print(f"the gateway adds {(medians['http'] - medians['zeromq']) * 1e3:.3f} ms "
          f"(median against median)")


if __name__ == "__main__":
    main()
