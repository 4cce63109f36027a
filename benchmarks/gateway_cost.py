"""What the HTTP gateway costs: one request set streamed through the ZeroMQ client and through
the gateway (the ``openai`` SDK, ``/v1/completions``), against one running ``pagedserve up``,
alternating, at the same concurrency.

    pagedserve up &        # then:
    python -m pagedserve.benchmarks.gateway_cost --streams 64 --rounds 3

Each stream sends random token prompts (``--prompt-len``, ids drawn as the shared workloads'
are) for ``--output-len`` tokens, greedy, EOS ignored; a round first runs a warm-up
request of each kind. Prompts differ between rounds and paths, so the prefix cache never
answers. Printed per path: total tokens/s (prompt + output over the wall time of the
round) and median time to first token; the best round of each.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

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


async def http_round(sdk: AsyncOpenAI, model: str, batch: list[list[int]], output_len: int):
    async def one(prompt):
        start, first = time.perf_counter(), None
        stream = await sdk.completions.create(model=model, prompt=prompt, max_tokens=output_len,
                                              temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
        async for _ in stream:
            first = first or time.perf_counter() - start
        return first
    return await asyncio.gather(*(one(p) for p in batch))


async def main_async(args) -> None:
    client = AsyncClient(tcp_endpoint(args.client_port, "127.0.0.1"), timeout=300)
    sdk = AsyncOpenAI(base_url=f"http://127.0.0.1:{args.http_port}/v1",
                      api_key=args.api_key or "none", max_retries=0, timeout=300)
    model = (await sdk.models.list()).data[0].id
    tokens = args.streams * (args.prompt_len + args.output_len)
    best = {"zeromq": (0.0, 0.0), "http": (0.0, 0.0)}
    seed = 0
    for round_ in range(args.rounds):
        for path in ("zeromq", "http"):
            seed += 1
            warm, batch = prompts(1, args.prompt_len, -seed), prompts(args.streams, args.prompt_len, seed)
            run = (lambda b: zeromq_round(client, b, args.output_len)) if path == "zeromq" \
                else (lambda b: http_round(sdk, model, b, args.output_len))
            await run(warm)
            start = time.perf_counter()
            firsts = await run(batch)
            rate, ttft = tokens / (time.perf_counter() - start), statistics.median(firsts)
            print(f"round {round_ + 1} {path:7s} {rate:8.1f} total tok/s  median TTFT "
                  f"{ttft * 1e3:7.1f} ms", flush=True)
            if rate > best[path][0]:
                best[path] = (rate, ttft)
    (zr, zt), (hr, ht) = best["zeromq"], best["http"]
    print(f"best: zeromq {zr:.1f} tok/s, TTFT {zt * 1e3:.1f} ms; http {hr:.1f} tok/s, TTFT "
          f"{ht * 1e3:.1f} ms; the gateway costs {100 * (1 - hr / zr):.1f}% of tokens/s and "
          f"{(ht - zt) * 1e3:.1f} ms of median TTFT")
    await client.close()
    await sdk.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-port", type=int, default=5555)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
