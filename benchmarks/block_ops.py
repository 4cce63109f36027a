"""The cache engine's block operations, timed: copy-on-write (device -> device), swap out
(device -> CPU swap space) and swap in (CPU -> device) of 1-256 blocks across every layer.

    python -m pagedserve.benchmarks.block_ops [--device cpu|cuda] [--dtype bfloat16] [--json]

SmolLM2's shape by default (30 layers, 3 KV heads, head_dim 64, blocks of 16 slots: 368.6 KB a
block in bf16). Pools of 1,024 blocks on each side, block ids drawn at random (a pool in use is
fragmented). On CUDA, times are CUDA events over repeated launches (``triton.testing.do_bench``),
the copies complete; on CPU, the median of repeated calls. Prints each operation's time and
GB/s, and the path the engine chose for it (``CacheEngine.paths``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

BLOCKS = (1, 16, 64, 256)  # blocks moved by one operation
OPS = {"copy_blocks": "copies", "swap_out": "swap_out", "swap_in": "swap_in"}  # method: path
POOL = 1024


def block_op_rows(device: str, dtype: torch.dtype, num_layers: int = 30, kv_heads: int = 3,
                  head_dim: int = 64, block_size: int = 16) -> list[dict]:
    """One row per operation and block count: microseconds, GB/s, the engine's path."""
    from pagedserve.executor_svc.cache_engine import CacheEngine

    config = SimpleNamespace(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim)
    cache = CacheEngine(config, block_size, POOL, POOL, dtype, device)
    per_block = CacheEngine.bytes_per_block(config, block_size, dtype)
    rows = []
    for op, path in OPS.items():
        for num_blocks in BLOCKS:
            src, dst = torch.randperm(POOL)[:2 * num_blocks].view(2, -1)
            pairs = torch.stack([src, dst], 1)
            seconds = _time(lambda: getattr(cache, op)(pairs), device)
            rows.append({"op": op, "blocks": num_blocks, "us": seconds * 1e6,
                         "GBps": num_blocks * per_block / seconds / 1e9,
                         "path": cache.paths[path]})
    return rows


def _time(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn) / 1e3
    for _ in range(3):
        fn()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_rows(rows: list[dict]) -> list[str]:
    lines = ["block ops: op          blocks        us     GB/s  path"]
    lines += [f"           {r['op']:<11} {r['blocks']:>6} {r['us']:>9.1f} {r['GBps']:>8.2f}  "
              f"{r['path']}" for r in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    args = parser.parse_args()
    rows = block_op_rows(args.device, getattr(torch, args.dtype))
    print(json.dumps(rows) if args.json else "\n".join(format_rows(rows)))


if __name__ == "__main__":
    main()
