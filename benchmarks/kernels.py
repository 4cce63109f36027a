"""Paged attention kernels on a GPU: time, achieved bandwidth, and the cost of paging.

    python -m pagedserve.benchmarks.kernels [--dtype bfloat16] [--json]

Decode: for batch sizes 1-256 and context lengths 128-8192 (SmolLM2's shape by default: 9 query
heads, 3 KV heads, head_dim 64, block size 16), the time of ``kernels.paged_decode_attention``
over shuffled block tables; its achieved bandwidth (bytes of K/V read / time) against the
device's measured copy bandwidth; and its time against torch's
``scaled_dot_product_attention`` over the same K/V stored contiguously (no paging); and both
again replayed from a CUDA graph (``*_graph_us``), as the engine's decode graphs run the kernel:
without the host's launch cost, which at small batches is longer than the kernel, but with L2
left warm between calls. Prefill:
``kernels.paged_prefill_attention`` against SDPA (causal) on the same prompts, with the tile
timed fastest at its first launch (the config it chose) and with the interpreter's default
tile, in the same run. Block ops: the
cache engine's copy-on-write, swap out and swap in over all layers, for 1-256 blocks
(``benchmarks.block_ops``), in GB/s and against the copy bandwidth, with the path each took.
Times are CUDA events over repeated launches after a warm-up (``triton.testing.do_bench``).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from pagedserve.benchmarks.block_ops import block_op_rows

BATCHES = (1, 8, 32, 64, 128, 256)
CONTEXTS = (128, 512, 1024, 2048, 4096, 8192)
PROMPTS = ((1, 512), (4, 512), (8, 1024), (4, 2048))  # (sequences, prompt length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30, help="For the block ops.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels needs a CUDA device: the kernels' timings on "
                         "triton's CPU interpreter say nothing about them")
    shape = Shape(getattr(torch, args.dtype), args.heads, args.kv_heads, args.head_dim,
                  args.block_size)
    copy_gbs = copy_bandwidth()
    decode = [decode_row(shape, batch, context, copy_gbs)
              for batch in BATCHES for context in CONTEXTS
              if batch * context <= 256 * 8192]
    prefill = [prefill_row(shape, num_seqs, prompt_len) for num_seqs, prompt_len in PROMPTS]
    block_ops = [{**row, "of_copy_bandwidth": row["GBps"] / copy_gbs}
                 for row in block_op_rows("cuda", shape.dtype, args.layers, shape.kv_heads,
                                          shape.head_dim, shape.block_size)]
    report = {"device": torch.cuda.get_device_name(), "dtype": args.dtype,
              "copy_GBps": copy_gbs, "decode": decode, "prefill": prefill,
              "block_ops": block_ops}
    print(json.dumps(report) if args.json else format_report(report))


class Shape:
    def __init__(self, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                 block_size: int):
        self.dtype, self.heads, self.kv_heads = dtype, heads, kv_heads
        self.head_dim, self.block_size = head_dim, block_size


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy: read + write bytes over time."""
    from triton.testing import do_bench

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6


def paged_cache(shape: Shape, lens: list[int]):
    """K/V caches holding sequences of ``lens`` tokens in shuffled blocks, their tables, and
    the same K/V gathered contiguously ``[S, kv_heads, max_len, head_dim]``."""
    bs = shape.block_size
    blocks_per_seq = [-(-n // bs) for n in lens]
    num_blocks = sum(blocks_per_seq)
    cache_shape = (num_blocks, bs, shape.kv_heads, shape.head_dim)
    key_cache = torch.randn(cache_shape, dtype=shape.dtype, device="cuda")
    value_cache = torch.randn(cache_shape, dtype=shape.dtype, device="cuda")
    order = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[start:start + n]
        start += n
    contiguous = [
        torch.stack([cache[tables[i].long()].flatten(0, 1)[:width * bs]
                     for cache in (key_cache, value_cache)]).transpose(1, 2)
        for i in range(len(lens))]  # [2, kv_heads, width * bs, head_dim] each
    keys = torch.stack([c[0] for c in contiguous])
    values = torch.stack([c[1] for c in contiguous])
    return key_cache, value_cache, tables, keys, values


def decode_row(shape: Shape, batch: int, context: int, copy_gbs: float) -> dict:
    from triton.testing import do_bench, do_bench_cudagraph

    from pagedserve import kernels

    key_cache, value_cache, tables, keys, values = paged_cache(shape, [context] * batch)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, shape.heads, shape.head_dim, dtype=shape.dtype, device="cuda")
    scale = shape.head_dim ** -0.5

    def paged():
        return kernels.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens,
                                              scale)

    group = shape.heads // shape.kv_heads
    q = query.view(batch, shape.kv_heads, group, shape.head_dim)

    def sdpa():
        return F.scaled_dot_product_attention(q, keys[:, :, :context], values[:, :, :context],
                                              scale=scale)

    paged_ms, sdpa_ms = do_bench(paged), do_bench(sdpa)
    paged_graph_ms, sdpa_graph_ms = do_bench_cudagraph(paged), do_bench_cudagraph(sdpa)
    kv_bytes = 2 * batch * context * shape.kv_heads * shape.head_dim * key_cache.element_size()
    achieved = kv_bytes / paged_ms / 1e6
    return {"batch": batch, "context": context, "paged_us": paged_ms * 1e3,
            "sdpa_us": sdpa_ms * 1e3, "paged_over_sdpa": paged_ms / sdpa_ms,
            "GBps": achieved, "of_copy_bandwidth": achieved / copy_gbs,
            "paged_graph_us": paged_graph_ms * 1e3, "sdpa_graph_us": sdpa_graph_ms * 1e3,
            "graph_paged_over_sdpa": paged_graph_ms / sdpa_graph_ms}


def prefill_row(shape: Shape, num_seqs: int, prompt_len: int) -> dict:
    from triton.testing import do_bench

    from pagedserve import kernels
    from pagedserve.kernels import prefill

    key_cache, value_cache, tables, keys, values = paged_cache(shape, [prompt_len] * num_seqs)
    seq_lens = torch.full((num_seqs,), prompt_len, dtype=torch.int32, device="cuda")
    starts = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda") * prompt_len
    query = torch.randn(num_seqs * prompt_len, shape.heads, shape.head_dim, dtype=shape.dtype,
                        device="cuda")
    scale = shape.head_dim ** -0.5

    def paged(config=None):
        return kernels.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens,
                                               starts, scale, max_query_len=prompt_len,
                                               config=config)

    paged_ms = do_bench(paged)  # the tile timed fastest here at the first launch (autotune)
    default_ms = do_bench(lambda: paged(prefill._DEFAULT))
    chosen = getattr(prefill._tuned, "best_config", None)
    group = shape.heads // shape.kv_heads
    q = query.view(num_seqs, prompt_len, shape.heads, shape.head_dim).transpose(1, 2)
    k = keys[:, :, :prompt_len].repeat_interleave(group, dim=1)
    v = values[:, :, :prompt_len].repeat_interleave(group, dim=1)
    sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              scale=scale))
    return {"sequences": num_seqs, "prompt_len": prompt_len, "paged_us": paged_ms * 1e3,
            "sdpa_us": sdpa_ms * 1e3, "paged_over_sdpa": paged_ms / sdpa_ms,
            "default_tile_us": default_ms * 1e3, "tile": str(chosen)}


def format_report(report: dict) -> str:
    lines = [(f"{report['device']}, {report['dtype']}, device copy bandwidth "
              f"{report['copy_GBps']:.0f} GB/s"),
             "decode: batch context  paged_us  sdpa_us  paged/sdpa  GB/s  of copy bw  "
             "graphs: paged_us  sdpa_us  paged/sdpa"]
    lines += [f"        {r['batch']:>5} {r['context']:>7} {r['paged_us']:>9.1f} "
              f"{r['sdpa_us']:>8.1f} {r['paged_over_sdpa']:>10.2f} {r['GBps']:>6.0f} "
              f"{r['of_copy_bandwidth']:>10.0%}  {r['paged_graph_us']:>16.1f} "
              f"{r['sdpa_graph_us']:>8.1f} {r['graph_paged_over_sdpa']:>10.2f}"
              for r in report["decode"]]
    lines.append("prefill: seqs prompt  paged_us  sdpa_us  paged/sdpa  default tile us  tile")
    lines += [f"         {r['sequences']:>4} {r['prompt_len']:>6} {r['paged_us']:>9.1f} "
              f"{r['sdpa_us']:>8.1f} {r['paged_over_sdpa']:>10.2f} {r['default_tile_us']:>16.1f}"
              f"  {r['tile']}" for r in report["prefill"]]
    lines.append("block ops: op          blocks      us    GB/s  of copy bw  path")
    lines += [f"           {r['op']:<11} {r['blocks']:>6} {r['us']:>7.1f} {r['GBps']:>7.1f} "
              f"{r['of_copy_bandwidth']:>10.0%}  {r['path']}" for r in report["block_ops"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
