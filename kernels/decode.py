"""Paged decode attention in Triton: each sequence's one new token attends to its paged KV cache.

A program serves one (sequence, kv head): it loads the query heads that share the kv head as the
rows of one tile, so each K/V load feeds the whole group (GQA, MQA; a group of one for MHA). It
walks the context a tile of ``TILE_TOKENS`` tokens at a time, looking each token's block up in the
block table, and keeps an online softmax (running max and sum) in fp32.

Two launch shapes share that walk:

- one pass: grid ``(num_seqs, num_kv_heads)``, each program walks its whole context and writes
  the output;
- split-K: grid ``(num_seqs, num_kv_heads, partitions)``, each program walks one partition of
  ``partition_size`` tokens and writes its partial output, max and sum; a reduce kernel, grid
  ``(num_seqs, num_heads)``, merges the partitions by log-sum-exp.

``use_split_k`` holds the rule that picks between them, ``partition_size_for`` the partition size.

Why the partition size adapts: the GPU is full only when the grid has a few programs per SM
(``PROGRAMS_PER_SM`` times the device's SM count: the *busy grid*). With a fixed 512-token
partition, a small batch cannot get there: on an H200 (132 SMs), one sequence of 8192 tokens
with SmolLM2's 3 kv heads makes 48 programs, eight sequences 384, each a serial walk of 16 tiles,
and below 64 sequences decode measured 1.3-7.4x SDPA's time (BENCHMARKS.md, "Kernels"). The
rule: the partition is the largest power of two from ``MIN_PARTITION_SIZE`` (128) to
``PARTITION_SIZE`` (512) whose split-K grid, ``num_seqs * num_kv_heads * cdiv(max_seq_len,
partition)``, reaches the busy grid; 128 when none does. A large batch keeps 512 and pays
nothing more. The floor of 128 keeps each program at four tiles or more: a shorter walk is not
worth a second launch (a context of 128 tokens or fewer stays in one pass), and the partials
written and read back stay near ``2 * group / partition`` of the 16-bit K/V bytes read (5% for
SmolLM2's groups of 3). The reduce merges ``PARTITION_CHUNK`` partitions per step, so that many
partitions do not make its own walk long.

Captured in a CUDA graph, a launch must not depend on what changes between replays: the
grids, the partition size and the split-K choice are functions of the batch size, the number
of kv heads, ``max_seq_len`` (for the decode graphs, the block tables' width times the block
size, fixed at capture) and the device, never of the context lengths in ``seq_lens``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cache_ops import check_cache_pair

# Context tokens per step of the walk, gathered across blocks through the block table, so that
# tl.dot sees at least 16 columns even with 8-token blocks.
TILE_TOKENS = 32
# tl.dot needs every dimension to be at least 16: the query heads of one kv head fill the first
# rows of a 16-row tile, and head dims are padded to a power of two of at least 16.
MIN_DOT_SIZE = 16
# Split-K's tokens per partition: at most PARTITION_SIZE, at least MIN_PARTITION_SIZE, a power
# of two in between (a multiple of TILE_TOKENS), chosen by partition_size_for.
PARTITION_SIZE = 512
MIN_PARTITION_SIZE = 128
# Partitions the reduce merges per step of its walk.
PARTITION_CHUNK = 16
# A one-pass program walks its context alone, so a long context leaves a small grid with few
# programs each doing a long serial walk while most SMs idle. Split-K pays for a second launch
# and the partials' round trip through memory, worth it (as in vLLM's paged attention v1/v2
# choice) once the one-pass grid is below the busy grid, a few programs per SM, or when one
# context is long enough that its walk dominates the step anyway.
PROGRAMS_PER_SM = 4
# SMs assumed off CUDA (triton's interpreter), an H100's or H200's count, so that the CPU
# tests plan the launches such a GPU would get.
DEFAULT_SMS = 132
LONG_CONTEXT = 8192
LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def busy_grid(device: torch.device) -> int:
    """Programs that fill ``device``: ``PROGRAMS_PER_SM`` per SM."""
    if device.type != "cuda":
        return PROGRAMS_PER_SM * DEFAULT_SMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def partition_size_for(max_seq_len: int, num_programs: int, busy: int) -> int:
    """The largest power of two from ``MIN_PARTITION_SIZE`` to ``PARTITION_SIZE`` that splits
    contexts of ``max_seq_len`` into a grid of at least ``busy`` programs, with
    ``num_programs`` (num_seqs * num_kv_heads) per partition; the smallest when none does."""
    size = PARTITION_SIZE
    while size > MIN_PARTITION_SIZE and num_programs * triton.cdiv(max_seq_len, size) < busy:
        size //= 2
    return size


def use_split_k(max_seq_len: int, num_programs: int, partition_size: int, busy: int) -> bool:
    """Whether to split the context: it spans more than one partition, and the one-pass grid of
    ``num_programs`` (num_seqs * num_kv_heads) is below ``busy`` or a context is very long."""
    if max_seq_len <= partition_size:
        return False
    return num_programs < busy or max_seq_len > LONG_CONTEXT


@triton.jit
def _load_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, group,
                head_dim, GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """The query heads of ``kv_head`` as fp32 rows; padding rows and columns are zero."""
    rows = tl.arange(0, GROUP_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    heads = kv_head * group + rows
    offsets = seq * stride_query_seq + heads * stride_query_head + dims
    return tl.load(query_ptr + offsets, mask=(rows < group) & (dims < head_dim),
                   other=0.0).to(tl.float32)


@triton.jit
def _attend(q, key_cache_ptr, value_cache_ptr, table_ptr, kv_head, start, end, qk_scale,
            head_dim, stride_cache_block, stride_cache_token, stride_cache_head,
            BLOCK_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
            TILE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of ``q`` over context tokens ``[start, end)``: the output normalised by
    its sum, the running max (log2 units) and the sum, per query row."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for tile_start in range(start, end, TILE):
        positions = tile_start + tl.arange(0, TILE)
        in_context = positions < end
        block_ids = tl.load(table_ptr + positions // BLOCK_SIZE, mask=in_context, other=0)
        # int64: block_id * stride_cache_block overflows int32 in a large cache.
        rows = (block_ids.to(tl.int64) * stride_cache_block
                + (positions % BLOCK_SIZE) * stride_cache_token + kv_head * stride_cache_head)
        offsets = rows[:, None] + dims[None, :]
        mask = in_context[:, None] & (dims < head_dim)[None, :]
        k = tl.load(key_cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(value_cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(in_context[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc / row_sum[:, None], row_max, row_sum


@triton.jit
def _decode_one_pass_kernel(out_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
                            block_tables_ptr, seq_lens_ptr, qk_scale, group, head_dim,
                            stride_query_seq, stride_query_head, stride_out_seq, stride_out_head,
                            stride_table, stride_cache_block, stride_cache_token,
                            stride_cache_head, BLOCK_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                            HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    q = _load_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, group,
                    head_dim, GROUP_PAD, HEAD_DIM_PAD)
    out, _, _ = _attend(q, key_cache_ptr, value_cache_ptr, block_tables_ptr + seq * stride_table,
                        kv_head, 0, seq_len, qk_scale, head_dim, stride_cache_block,
                        stride_cache_token, stride_cache_head, BLOCK_SIZE, GROUP_PAD,
                        HEAD_DIM_PAD, TILE, DOT_PRECISION)
    rows = tl.arange(0, GROUP_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    offsets = seq * stride_out_seq + (kv_head * group + rows) * stride_out_head + dims
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty),
             mask=(rows < group) & (dims < head_dim))


@triton.jit
def _decode_partition_kernel(partial_out_ptr, partial_max_ptr, partial_sum_ptr, query_ptr,
                             key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
                             qk_scale, group, head_dim, num_heads, max_partitions,
                             stride_query_seq, stride_query_head, stride_table,
                             stride_cache_block, stride_cache_token, stride_cache_head,
                             PARTITION_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                             TILE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = partition * PARTITION_SIZE
    if start >= seq_len:  # past this sequence's context; the reduce never reads it
        return
    q = _load_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, group,
                    head_dim, GROUP_PAD, HEAD_DIM_PAD)
    out, row_max, row_sum = _attend(
        q, key_cache_ptr, value_cache_ptr, block_tables_ptr + seq * stride_table, kv_head, start,
        tl.minimum(start + PARTITION_SIZE, seq_len), qk_scale, head_dim, stride_cache_block,
        stride_cache_token, stride_cache_head, BLOCK_SIZE, GROUP_PAD, HEAD_DIM_PAD, TILE,
        DOT_PRECISION)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    # partials are [num_seqs, num_heads, max_partitions(, head_dim)], contiguous
    partials = (seq * num_heads + kv_head * group + rows) * max_partitions + partition
    tl.store(partial_max_ptr + partials, row_max, mask=rows < group)
    tl.store(partial_sum_ptr + partials, row_sum, mask=rows < group)
    tl.store(partial_out_ptr + partials[:, None] * head_dim + dims, out,
             mask=(rows < group)[:, None] & (dims < head_dim))


@triton.jit
def _reduce_partitions_kernel(out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr,
                              seq_lens_ptr, head_dim, num_heads, max_partitions,
                              stride_out_seq, stride_out_head, PARTITION_SIZE: tl.constexpr,
                              HEAD_DIM_PAD: tl.constexpr, CHUNK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_partitions = tl.cdiv(tl.load(seq_lens_ptr + seq), PARTITION_SIZE)
    first = (seq * num_heads + head) * max_partitions
    dims = tl.arange(0, HEAD_DIM_PAD)
    total_max = tl.full([], float("-inf"), tl.float32)
    total_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], tl.float32)
    for chunk_start in range(0, num_partitions, CHUNK):
        # each partial output is normalised by its own sum: weigh it by that sum, rescaled to
        # the running max; partitions past the context weigh 0 (max -inf, sum 0)
        partitions = first + chunk_start + tl.arange(0, CHUNK)
        valid = chunk_start + tl.arange(0, CHUNK) < num_partitions
        part_max = tl.load(partial_max_ptr + partitions, mask=valid, other=float("-inf"))
        new_max = tl.maximum(total_max, tl.max(part_max, 0))
        rescale = tl.exp2(total_max - new_max)
        weights = (tl.load(partial_sum_ptr + partitions, mask=valid, other=0.0)
                   * tl.exp2(part_max - new_max))
        part_out = tl.load(partial_out_ptr + partitions[:, None] * head_dim + dims[None, :],
                           mask=valid[:, None] & (dims < head_dim)[None, :], other=0.0)
        acc = acc * rescale + tl.sum(part_out * weights[:, None], 0)
        total_sum = total_sum * rescale + tl.sum(weights, 0)
        total_max = new_max
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
             (acc / total_sum).to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def paged_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                           block_tables: Tensor, seq_lens: Tensor, scale: float, *,
                           out: Tensor | None = None, max_seq_len: int | None = None,
                           split_k: bool | None = None,
                           partition_size: int | None = None) -> Tensor:
    """Attention of each sequence's one new token over its whole paged context.

    ``query`` is ``[num_seqs, num_heads, head_dim]`` (fp32, fp16 or bf16), the caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` of the same dtype with ``num_heads`` a
    multiple of ``num_kv_heads`` (query head ``h`` reads kv head ``h // (num_heads //
    num_kv_heads)``), ``block_tables`` int32 ``[num_seqs, max_blocks]`` and ``seq_lens`` int32
    ``[num_seqs]``: the tokens in the cache for each sequence, its new token included, at least 1.
    Scores are ``scale * q.k``, accumulated in fp32. Returns ``[num_seqs, num_heads, head_dim]``
    in the query's dtype, written into ``out`` when given.

    ``max_seq_len`` bounds ``seq_lens`` from the host; it defaults to the block tables' capacity,
    ``max_blocks * block_size``, which needs no device sync. ``split_k`` forces the one-pass
    (False) or the split-K (True) kernel, None lets ``use_split_k`` choose; ``partition_size``
    is split-K's tokens per partition, a multiple of ``TILE_TOKENS``, None lets
    ``partition_size_for`` choose. Both choices depend on the shapes, ``max_seq_len`` and the
    device only, so that a launch captured in a CUDA graph stays valid for any ``seq_lens``.
    """
    out = torch.empty_like(query) if out is None else out
    for kernel, grid, args in decode_launches(query, key_cache, value_cache, block_tables,
                                              seq_lens, scale, out, max_seq_len, split_k,
                                              partition_size):
        kernel[grid](**args)
    return out


def decode_launches(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, scale: float, out: Tensor, max_seq_len: int | None,
                    split_k: bool | None, partition_size: int | None) -> list[tuple]:
    """The ``(kernel, grid, arguments)`` launches that ``paged_decode_attention`` makes, in order,
    after validating its inputs; split-K's partial buffers are allocated here."""
    _check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens, out,
                         partition_size)
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1:3]
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    busy = busy_grid(query.device)
    if partition_size is None:
        partition_size = partition_size_for(max_seq_len, num_seqs * num_kv_heads, busy)
    if split_k is None:
        split_k = use_split_k(max_seq_len, num_seqs * num_kv_heads, partition_size, busy)
    group = num_heads // num_kv_heads
    shared = {
        "query_ptr": query, "key_cache_ptr": key_cache, "value_cache_ptr": value_cache,
        "block_tables_ptr": block_tables, "seq_lens_ptr": seq_lens, "qk_scale": scale * LOG2E,
        "group": group, "head_dim": head_dim, "stride_query_seq": query.stride(0),
        "stride_query_head": query.stride(1), "stride_table": block_tables.stride(0),
        "stride_cache_block": key_cache.stride(0), "stride_cache_token": key_cache.stride(1),
        "stride_cache_head": key_cache.stride(2), "BLOCK_SIZE": block_size,
        "GROUP_PAD": max(MIN_DOT_SIZE, triton.next_power_of_2(group)),
        "HEAD_DIM_PAD": max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim)), "TILE": TILE_TOKENS,
        # K and V are upcast to fp32 as they are loaded (triton's interpreter gets bf16
        # arithmetic wrong); fp16/bf16 values are exact in tf32, so the tensor cores lose nothing
        # on q.k (p.v rounds p to tf32, as FlashAttention rounds it to fp16), and fp32 inputs
        # keep full precision with IEEE dots.
        "DOT_PRECISION": "ieee" if query.dtype == torch.float32 else "tf32"}
    outputs = {"out_ptr": out, "stride_out_seq": out.stride(0), "stride_out_head": out.stride(1)}
    if not split_k:
        return [(_decode_one_pass_kernel, (num_seqs, num_kv_heads), {**shared, **outputs})]
    max_partitions = triton.cdiv(max_seq_len, partition_size)
    partial_shape = (num_seqs, num_heads, max_partitions)
    partials = {
        "partial_out_ptr": query.new_empty((*partial_shape, head_dim), dtype=torch.float32),
        "partial_max_ptr": query.new_empty(partial_shape, dtype=torch.float32),
        "partial_sum_ptr": query.new_empty(partial_shape, dtype=torch.float32),
        "num_heads": num_heads, "max_partitions": max_partitions,
        "PARTITION_SIZE": partition_size}
    reduce_args = {**partials, **outputs, "seq_lens_ptr": seq_lens, "head_dim": head_dim,
                   "HEAD_DIM_PAD": shared["HEAD_DIM_PAD"], "CHUNK": PARTITION_CHUNK}
    return [(_decode_partition_kernel, (num_seqs, num_kv_heads, max_partitions),
             {**shared, **partials}),
            (_reduce_partitions_kernel, (num_seqs, num_heads), reduce_args)]


def _check_decode_inputs(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                         block_tables: Tensor, seq_lens: Tensor, out: Tensor,
                         partition_size: int | None) -> None:
    check_cache_pair(key_cache, value_cache)
    num_kv_heads, head_dim = key_cache.shape[2:]
    if query.dim() != 3 or query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(f"query must be [num_seqs, num_heads, {head_dim}] with num_heads a "
                         f"multiple of num_kv_heads {num_kv_heads}, got {tuple(query.shape)}")
    if query.dtype not in _DTYPES or query.dtype != key_cache.dtype:
        raise ValueError(f"query and caches must share one dtype of {_DTYPES}, got query "
                         f"{query.dtype} and caches {key_cache.dtype}")
    if query.device != key_cache.device or query.stride(-1) != 1:
        raise ValueError(f"query must be on the caches' device {key_cache.device} with a "
                         f"contiguous last dimension, got {query.device}, strides "
                         f"{query.stride()}")
    num_seqs = query.shape[0]
    if (block_tables.dim() != 2 or block_tables.shape[0] != num_seqs
            or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1
            or block_tables.device != query.device):
        raise ValueError(f"block_tables must be int32 [{num_seqs}, max_blocks] with contiguous "
                         f"rows on {query.device}, got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)} on {block_tables.device}")
    if (seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32
            or seq_lens.device != query.device):
        raise ValueError(f"seq_lens must be int32 [{num_seqs}] on {query.device}, got "
                         f"{seq_lens.dtype} {tuple(seq_lens.shape)} on {seq_lens.device}")
    if (out.shape != query.shape or out.dtype != query.dtype or out.device != query.device
            or out.stride(-1) != 1):
        raise ValueError(f"out must be {query.dtype} {tuple(query.shape)} on {query.device} "
                         f"with a contiguous last dimension, got {out.dtype} {tuple(out.shape)} "
                         f"on {out.device}, strides {out.stride()}")
    if partition_size is not None and (partition_size <= 0 or partition_size % TILE_TOKENS):
        raise ValueError(f"partition_size must be a positive multiple of {TILE_TOKENS}, "
                         f"got {partition_size}")
