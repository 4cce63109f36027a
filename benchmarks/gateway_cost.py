"""What the HTTP gateway costs: one request set streamed through the ZeroMQ client and through
the gateway (``/v1/completions``, read by the ``openai`` SDK and by a plain SSE reader as
vLLM's benchmark client has), against one running ``pagedserve up``, alternating, at the same
concurrency.

    pagedserve up &        # then:
    python -m pagedserve.benchmarks.gateway_cost --streams 64 --rounds 3

Each stream sends random token prompts (``--prompt-len``, ids drawn as the shared workloads'
are) for ``--output-len`` tokens, greedy, EOS ignored; a round first runs a warm-up
request of each kind. Prompts differ between rounds, paths and runs (unless ``--seed``
repeats one), so the prefix cache never answers. Printed per path: total tokens/s (prompt +
output over the wall time of the round), median time to first token, and the CPU time of
this client and of the gateway (its ``/metrics``); the best round of each. Then, on the
idle server, single requests one at a time: the time to first token the gateway adds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx
from openai import AsyncOpenAI

from pagedserve.common.client import AsyncClient
from pagedserve.common.config import tcp_endpoint
from pagedserve.common.sampling import SamplingParams


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1000, 48999) for _ in range(length)] for _ in range(count)]


async def zeromq_round(client: AsyncClient, batch: list[list[int]], output_len: int):
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def one(prompt):
        start, first = time.perf_counter(), None
        async for _ in client.stream(prompt, params):
            first = first or time.perf_counter() - start
        return first
    return await asyncio.gather(*(one(p) for p in batch))


async def sdk_round(sdk: AsyncOpenAI, model: str, batch: list[list[int]], output_len: int):
    async def one(prompt):
        start, first = time.perf_counter(), None
        stream = await sdk.completions.create(model=model, prompt=prompt, max_tokens=output_len,
                                              temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
        async for _ in stream:
            first = first or time.perf_counter() - start
        return first
    return await asyncio.gather(*(one(p) for p in batch))


async def sse_round(http: httpx.AsyncClient, model: str, batch: list[list[int]],
                    output_len: int):
    """As ``vllm bench serve``'s client reads a stream: the event lines, each one's JSON
    parsed, no objects built; the gateway's own cost, with less of the client's."""
    async def one(prompt):
        start, first = time.perf_counter(), None
        body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                "stream": True, "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    json.loads(line[6:])
                    first = first or time.perf_counter() - start
        return first
    return await asyncio.gather(*(one(p) for p in batch))


async def gateway_cpu_s(http: httpx.AsyncClient) -> float:
    """The gateway process' CPU time so far, from its ``/metrics`` (NaN from a gateway
    that does not report it)."""
    text = (await http.get("/metrics")).text
    prefix = "pagedserve_gateway_process_cpu_seconds_total "
    return next((float(line[len(prefix):]) for line in text.splitlines()
                 if line.startswith(prefix)), float("nan"))


async def idle_latency(rounds: dict, args, seed: int) -> None:
    """What the gateway adds to one request's time to first token on an idle server: one
    stream at a time, the paths alternating, ``--idle-requests`` each, each after a pause
    (a request sent as the one before ends can wait for a step still running for it)."""
    firsts: dict[str, list[float]] = {path: [] for path in rounds}
    for _ in range(args.idle_requests):
        for path, run in rounds.items():
            seed += 1
            await asyncio.sleep(0.1)
            firsts[path] += await run(prompts(1, args.prompt_len, seed))
    zeromq = statistics.median(firsts["zeromq"])
    for path, times in firsts.items():
        median = statistics.median(times)
        print(f"idle, one stream at a time: {path:8s} median TTFT {median * 1e3:6.1f} ms "
              f"(+{(median - zeromq) * 1e3:.1f} ms), "
              f"p90 {statistics.quantiles(times, n=10)[-1] * 1e3:6.1f} ms", flush=True)


async def main_async(args) -> None:
    client = AsyncClient(tcp_endpoint(args.client_port, "127.0.0.1"), timeout=300)
    base_url = f"http://127.0.0.1:{args.http_port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sdk = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=args.api_key or "none",
                      max_retries=0, timeout=300)
    http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300,
                             limits=httpx.Limits(max_connections=None))
    model = (await sdk.models.list()).data[0].id
    rounds = {"zeromq": lambda b: zeromq_round(client, b, args.output_len),
              "http sdk": lambda b: sdk_round(sdk, model, b, args.output_len),
              "http sse": lambda b: sse_round(http, model, b, args.output_len)}
    tokens = args.streams * (args.prompt_len + args.output_len)
    best = {path: (0.0, 0.0) for path in rounds}
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"prompt seed {seed}", flush=True)
    for round_ in range(args.rounds):
        for path, run in rounds.items():
            seed += 1
            await run(prompts(1, args.prompt_len, -seed))
            batch = prompts(args.streams, args.prompt_len, seed)
            gateway_cpu = await gateway_cpu_s(http)
            start, cpu = time.perf_counter(), time.process_time()
            firsts = await run(batch)
            rate, ttft = tokens / (time.perf_counter() - start), statistics.median(firsts)
            cpu, gateway_cpu = time.process_time() - cpu, await gateway_cpu_s(http) - gateway_cpu
            print(f"round {round_ + 1} {path:8s} {rate:8.1f} total tok/s  median TTFT "
                  f"{ttft * 1e3:7.1f} ms  CPU: client {cpu:5.2f} s, gateway {gateway_cpu:5.2f} s",
                  flush=True)
            best[path] = max(best[path], (rate, ttft))
    zr, zt = best["zeromq"]
    for path in ("http sdk", "http sse") if args.rounds else ():
        hr, ht = best[path]
        print(f"best: zeromq {zr:.1f} tok/s, TTFT {zt * 1e3:.1f} ms; {path} {hr:.1f} tok/s, "
              f"TTFT {ht * 1e3:.1f} ms: the gateway costs {100 * (1 - hr / zr):.1f}% of "
              f"tokens/s and {(ht - zt) * 1e3:.1f} ms of median TTFT")
    if args.idle_requests:
        await idle_latency(rounds, args, seed)
    await client.close()
    await sdk.close()
    await http.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-port", type=int, default=5555)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--idle-requests", type=int, default=20,
                        help="Then this many single requests per path, one at a time, for "
                             "the time to first token the gateway adds (0: none).")
    parser.add_argument("--seed", type=int, default=None,
                        help="The first round's prompt seed (default: a new one per run, so "
                             "that a second run against the same server misses its prefix "
                             "cache as the first did).")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
