"""Attention on the CPU: our paged kernel (``cpu_kernels.paged_attention``) against the torch
path it replaces, in SmolLM2's shape (9 query heads over 3 kv heads of 64, blocks of 16).

    python -m pagedserve.benchmarks.cpu_attention

- **decode**: 64 sequences of 300-700 tokens, one new token each, their blocks scattered over
  the pool; every call reads another layer's cache (30 of them, ~1.5 GB), so that, as in a
  real step, the context comes from memory. torch path: the gathered batched matmuls. Also
  ours over the same values in a bfloat16 cache (``--kv-cache-dtype bfloat16``): half the bytes;
  and a bf16 model's (bfloat16 queries too), which takes bf16 dot products where the build
  has AVX512_BF16: ``PAGEDSERVE_CPU_ISA=avx512`` runs the same without them.
- **prompt**: one prompt of 128 and one of 500 tokens with nothing cached, causal. torch path:
  its fused attention (``scaled_dot_product_attention``), as the executor called it per prompt.

Each side runs ``--rounds`` times in turn; medians are printed with their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.backends.cpu import CpuBackend
from pagedserve.executor_svc.backends.torch import TorchBackend, decode, prefill

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30
SCALE = HEAD_DIM ** -0.5


def _pool(num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks + 1, BLOCK, KV_HEADS, HEAD_DIM)  # + the null block
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    k_cache[-1], v_cache[-1] = 0, 0
    return k_cache, v_cache


def _timed(runs: dict, rounds: int) -> dict[str, float]:
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def decode_case(rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    lens = torch.randint(300, 700, (64,)).tolist()
    blocks = [-(-n // BLOCK) for n in lens]
    ids = torch.randperm(sum(blocks)).tolist()
    tables = [ids[sum(blocks[:i]):sum(blocks[:i + 1])] for i in range(len(lens))]
    caches = [_pool(sum(blocks)) for _ in range(LAYERS)]
    step = (tables, [n - 1 for n in lens], [1] * len(lens))
    batch = CpuBackend(BLOCK).build(*step).batch
    meta = TorchBackend(BLOCK, "cpu", null_block=sum(blocks)).build(*step)
    query = torch.randn(len(lens), HEADS, HEAD_DIM)

    def ours():
        for k_cache, v_cache in caches:
            cpu_kernels.paged_attention(query, k_cache, v_cache, batch, SCALE)

    def torch_path():
        for k_cache, v_cache in caches:
            decode(query, k_cache, v_cache, meta, SCALE)

    half_caches = [(k.bfloat16(), v.bfloat16()) for k, v in caches]

    def ours_bf16():
        for k_cache, v_cache in half_caches:
            cpu_kernels.paged_attention(query, k_cache, v_cache, batch, SCALE)

    bf16_query = query.bfloat16()
    # as a bf16 model's executor keeps them (pair layout where the build has bf16 products)
    model_caches = [CpuBackend(BLOCK).from_rows(k, v, torch.bfloat16) for k, v in half_caches]

    def bf16_model():
        for k_cache, v_cache in model_caches:
            cpu_kernels.paged_attention(bf16_query, k_cache, v_cache, batch, SCALE)

    k_cache, v_cache = caches[0]
    torch.testing.assert_close(
        cpu_kernels.paged_attention(query, k_cache, v_cache, batch, SCALE),
        decode(query, k_cache, v_cache, meta, SCALE), rtol=1e-4, atol=1e-4)
    runs = {"ours": ours, "torch": torch_path, "ours_bf16": ours_bf16, "bf16_model": bf16_model}
    return {name: t / LAYERS for name, t in _timed(runs, rounds).items()}


def prompt_case(length: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    blocks = -(-length // BLOCK)
    k_cache, v_cache = _pool(blocks)
    table = torch.randperm(blocks).tolist()
    batch = CpuBackend(BLOCK).build([table], [0], [length]).batch
    query = torch.randn(length, HEADS, HEAD_DIM)
    keys = k_cache[table].flatten(0, 1)[:length]
    values = v_cache[table].flatten(0, 1)[:length]

    def ours():
        return cpu_kernels.paged_attention(query, k_cache, v_cache, batch, SCALE)

    def torch_path():
        return prefill(query, keys, values, None, SCALE, HEADS // KV_HEADS)

    half = (query.bfloat16(),
            *CpuBackend(BLOCK).from_rows(k_cache.bfloat16(), v_cache.bfloat16(), torch.bfloat16))

    def bf16_model():
        return cpu_kernels.paged_attention(*half, batch, SCALE)

    torch.testing.assert_close(ours(), torch_path(), rtol=1e-4, atol=1e-4)
    return _timed({"ours": lambda: [ours() for _ in range(10)],
                   "torch": lambda: [torch_path() for _ in range(10)],
                   "bf16_model": lambda: [bf16_model() for _ in range(10)]}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if cpu_kernels.load() is None:
        raise SystemExit("the CPU kernels did not build here")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cpu_kernels.describe()}")
    cases = {"decode 64 x 300-700 tokens, per layer": decode_case(args.rounds)}
    for length in (128, 500):
        cases[f"prompt of {length}, per call"] = {
            name: t / 10 for name, t in prompt_case(length, args.rounds).items()}
    for case, times in cases.items():
        print(f"{case:38s} ours {times['ours'] * 1e3:7.3f} ms  torch {times['torch'] * 1e3:7.3f} "
              f"ms  {times['torch'] / times['ours']:5.2f}x")
    decode = cases["decode 64 x 300-700 tokens, per layer"]
    print(f"{'decode, bfloat16 cache, per layer':38s} ours {decode['ours_bf16'] * 1e3:7.3f} ms  "
          f"float32 cache {decode['ours'] * 1e3:7.3f} ms  "
          f"{decode['ours'] / decode['ours_bf16']:5.2f}x")
    print(f"{'bf16 model (bf16 queries and cache)':38s} decode {decode['bf16_model'] * 1e3:7.3f} "
          f"ms per layer; prompts of 128 / 500 "
          + " / ".join(f"{cases[f'prompt of {n}, per call']['bf16_model'] * 1e3:.3f}"
                       for n in (128, 500)) + " ms per call")


if __name__ == "__main__":
    main()
