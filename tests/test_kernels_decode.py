"""The Triton decode attention and block copy kernels against references: float64 attention,
exact block copies.

Without a GPU, conftest.py has the kernels run in triton's interpreter on CPU tensors, so sizes
stay small; the compile test still builds every kernel for sm_80 and sm_90.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedserve.kernels.cache_ops import copy_blocks, copy_blocks_launch
from pagedserve.kernels.decode import (
    DEFAULT_SMS,
    LONG_CONTEXT,
    MIN_PARTITION_SIZE,
    PARTITION_CHUNK,
    PARTITION_SIZE,
    PROGRAMS_PER_SM,
    TILE_TOKENS,
    busy_grid,
    decode_launches,
    paged_decode_attention,
    partition_size_for,
    use_split_k,
)
from pagedserve.kernels.layer_ops import (add_rms_norm_launch, greedy_launch,
                                          rope_write_kv_launch, silu_mul_launch)
from pagedserve.kernels.reference import paged_attention_reference

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# (num_heads, num_kv_heads, head_dim, block_size, dtype): each head layout, head dim, block size
# and dtype at least once, not their full product (the interpreter is slow).
CASES = [
    pytest.param(8, 2, 64, 16, torch.float32, id="gqa-d64-b16-fp32"),
    pytest.param(4, 4, 80, 8, torch.float32, id="mha-d80-b8-fp32"),
    pytest.param(4, 1, 80, 8, torch.float16, id="mqa-d80-b8-fp16"),
    pytest.param(8, 2, 128, 32, torch.float16, id="gqa-d128-b32-fp16"),
    pytest.param(4, 4, 128, 32, torch.bfloat16, id="mha-d128-b32-bf16"),
    pytest.param(4, 1, 64, 16, torch.bfloat16, id="mqa-d64-b16-bf16"),
]


def context_lens(block_size: int) -> list[int]:
    """One sequence each: a lone token, one short of a block, a full block, one past it, many."""
    return [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3]


def make_batch(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random queries and a cache holding each sequence's context in shuffled blocks.

    Every cache entry outside a context is NaN, block 0 among them, and block tables are padded
    with 0: a kernel that reads past a context returns NaN.
    """
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [triton.cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    pool = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = [[pool.pop() for _ in range(n)] + [0] * (max(blocks_needed) - n)
              for n in blocks_needed]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = (torch.full(shape, float("nan"), dtype=dtype) for _ in range(2))
    for table, seq_len in zip(tables, seq_lens):
        for position in range(seq_len):
            block_id, offset = table[position // block_size], position % block_size
            key_cache[block_id, offset] = torch.randn(num_kv_heads, head_dim, generator=g)
            value_cache[block_id, offset] = torch.randn(num_kv_heads, head_dim, generator=g)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (query, key_cache, value_cache,
                                        torch.tensor(tables, dtype=torch.int32),
                                        torch.tensor(seq_lens, dtype=torch.int32)))


def check_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, **options):
    """Our output, written over NaN, equals the reference within the dtype's tolerance."""
    query, key_cache, value_cache, block_tables, lens = make_batch(
        seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(query, key_cache, value_cache, block_tables, lens, scale, out=out,
                           **options)
    expected = paged_attention_reference(query, key_cache, value_cache, block_tables, lens,
                                         [1] * len(seq_lens), scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, dtype", CASES)
@pytest.mark.parametrize("split_k", [False, True], ids=["one-pass", "split-k"])
def test_decode_matches_reference_on_both_paths(num_heads, num_kv_heads, head_dim, block_size,
                                                dtype, split_k):
    # the smallest partition, so that the longest context spans several
    check_decode(context_lens(block_size), num_heads, num_kv_heads, head_dim, block_size, dtype,
                 split_k=split_k, partition_size=TILE_TOKENS)


@pytest.mark.parametrize("partition_size, dtype", [
    pytest.param(TILE_TOKENS, torch.float32, id="tile-fp32"),
    pytest.param(MIN_PARTITION_SIZE, torch.bfloat16, id="min-bf16"),
])
def test_split_k_matches_reference_around_partition_edges(partition_size, dtype):
    # a lone token, one short of a partition, a full one, one past it, and a context of more
    # partitions than the reduce merges in one step (the smallest partition only: interpreter)
    lens = [1, partition_size - 1, partition_size, partition_size + 1]
    if partition_size == TILE_TOKENS:
        lens.append(PARTITION_CHUNK * partition_size + 45)
    check_decode(lens, 6, 2, 64, 16, dtype, split_k=True, partition_size=partition_size)


H200_BUSY_GRID = PROGRAMS_PER_SM * 132


def test_split_k_rule_splits_long_contexts_unless_the_grid_is_busy():
    busy = H200_BUSY_GRID
    assert not use_split_k(PARTITION_SIZE, 1, PARTITION_SIZE, busy)
    assert use_split_k(PARTITION_SIZE + 1, 1, PARTITION_SIZE, busy)
    assert not use_split_k(LONG_CONTEXT, busy, PARTITION_SIZE, busy)
    assert use_split_k(LONG_CONTEXT + 1, busy, PARTITION_SIZE, busy)


@pytest.mark.parametrize("num_seqs, max_seq_len, expected", [
    (1, 8192, MIN_PARTITION_SIZE),  # 192 programs: as many as the smallest partition gives
    (8, 8192, 256),                 # 768 programs; at 512, 384
    (32, 2048, 256),                # 768; at 512, 384
    (64, 2048, PARTITION_SIZE),     # 768 already
    (256, 8192, PARTITION_SIZE),    # a busy one-pass grid
])
def test_partition_shrinks_for_small_batches_on_an_h200(num_seqs, max_seq_len, expected):
    # SmolLM2's 3 kv heads
    assert partition_size_for(max_seq_len, num_seqs * 3, H200_BUSY_GRID) == expected


def test_partition_is_the_largest_power_of_two_that_fills_the_grid():
    for num_programs in (1, 3, 24, 100, 384, 600):
        for max_seq_len in (1, 127, 128, 129, 1000, 4096, 32768):
            size = partition_size_for(max_seq_len, num_programs, H200_BUSY_GRID)
            assert MIN_PARTITION_SIZE <= size <= PARTITION_SIZE and size % TILE_TOKENS == 0
            assert size & (size - 1) == 0

            def busy(partition):
                return num_programs * triton.cdiv(max_seq_len, partition) >= H200_BUSY_GRID
            assert size == MIN_PARTITION_SIZE or busy(size)
            assert size == PARTITION_SIZE or not busy(2 * size)


def test_short_contexts_stay_in_one_pass_at_any_batch():
    for num_programs in (1, 3, 384, 10_000):
        size = partition_size_for(MIN_PARTITION_SIZE, num_programs, H200_BUSY_GRID)
        assert not use_split_k(MIN_PARTITION_SIZE, num_programs, size, H200_BUSY_GRID)


def test_busy_grid_off_cuda_assumes_a_large_gpu():
    assert busy_grid(torch.device("cpu")) == PROGRAMS_PER_SM * DEFAULT_SMS


def test_automatic_choice_splits_a_small_batch_into_small_partitions_and_matches_reference():
    seq_lens, shape = [PARTITION_SIZE + 37, 3], (4, 2, 64, 16, torch.float32)
    query, key_cache, value_cache, block_tables, lens = make_batch(seq_lens, *shape)
    launches = decode_launches(query, key_cache, value_cache, block_tables, lens, 1.0,
                               torch.empty_like(query), max_seq_len=None, split_k=None,
                               partition_size=None)
    # 560-token tables (35 blocks of 16), 4 programs per partition: the smallest partition
    partitions = triton.cdiv(35 * 16, MIN_PARTITION_SIZE)
    assert [grid for _, grid, _ in launches] == [(2, 2, partitions), (2, 4)]
    check_decode(seq_lens, *shape)


def test_launches_depend_on_shapes_not_on_context_lengths():
    # what a decode graph relies on: captured with one batch's seq_lens, replayed with others
    query, key_cache, value_cache, block_tables, lens = make_batch([600, 3], 4, 2, 64, 16,
                                                                   torch.float32)
    width = block_tables.shape[1] * 16

    def plan(seq_lens):
        launches = decode_launches(query, key_cache, value_cache, block_tables, seq_lens, 1.0,
                                   torch.empty_like(query), max_seq_len=width, split_k=None,
                                   partition_size=None)
        return [(kernel, grid, {name: value for name, value in args.items()
                                if not isinstance(value, torch.Tensor)})
                for kernel, grid, args in launches]

    assert plan(lens) == plan(torch.ones_like(lens)) == plan(torch.full_like(lens, width))


def test_automatic_choice_keeps_a_short_context_in_one_pass():
    query, key_cache, value_cache, block_tables, lens = make_batch([9, 3], 4, 2, 64, 8,
                                                                   torch.float32)
    launches = decode_launches(query, key_cache, value_cache, block_tables, lens, 1.0,
                               torch.empty_like(query), max_seq_len=None, split_k=None,
                               partition_size=None)
    assert [grid for _, grid, _ in launches] == [(2, 2)]


def decode_args() -> dict:
    query, key_cache, value_cache, block_tables, seq_lens = make_batch([5, 2], 8, 4, 64, 8,
                                                                       torch.float16)
    return {"query": query, "key_cache": key_cache, "value_cache": value_cache,
            "block_tables": block_tables, "seq_lens": seq_lens, "scale": 0.125}


@pytest.mark.parametrize("name, bad, message", [
    ("query", lambda a: a["query"][:, :6], r"multiple of num_kv_heads 4, got \(2, 6, 64\)"),
    ("query", lambda a: a["query"].float(), "got query torch.float32 and caches torch.float16"),
    ("value_cache", lambda a: a["value_cache"][:, :4], "value_cache shape"),
    ("block_tables", lambda a: a["block_tables"].long(), "block_tables must be int32"),
    ("seq_lens", lambda a: a["seq_lens"][:1], r"seq_lens must be int32 \[2\].*\(1,\)"),
    ("out", lambda a: torch.empty_like(a["query"][:1]), r"got torch.float16 \(1, 8, 64\)"),
    ("partition_size", lambda a: 48, "got 48"),
])
def test_decode_rejects_bad_inputs_naming_the_value(name, bad, message):
    args = decode_args()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**args)


def layer_major(num_planes, num_blocks, block_numel, dtype, seed):
    """A device pool's view: [num_blocks, planes, block_numel] over [planes, num_blocks, ...]."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_planes, num_blocks, block_numel, generator=g).to(dtype).to(DEVICE)
    return pool.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copy_blocks_moves_the_named_blocks_of_every_plane_and_nothing_else(dtype):
    # A device pool (layer-major) into a swap pool (block-major) and back: 3 of 7 blocks,
    # 6 planes (3 layers' K and V), 80-value blocks (a chunk and a masked tail).
    device = layer_major(6, 7, 80, dtype, seed=1)
    swap = torch.randn(5, 6, 80, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    pairs = torch.tensor([[4, 0], [0, 3], [6, 2]])
    expected = swap.clone()
    expected[pairs[:, 1]] = device[pairs[:, 0]]
    copy_blocks(device, swap, pairs.to(DEVICE))
    assert torch.equal(swap, expected)
    back = device.clone()
    back[[1, 2, 5]] = swap[[3, 2, 0]]
    copy_blocks(swap, device, torch.tensor([[3, 1], [2, 2], [0, 5]], device=DEVICE))
    assert torch.equal(device, back)


def test_copy_blocks_copies_on_write_within_one_pool():
    device = layer_major(4, 9, 3 * 64, torch.bfloat16, seed=3)
    expected = device.clone()
    expected[[7, 8]] = device[[2, 2]]  # a block shared by two forks, each copying it
    copy_blocks(device, device, torch.tensor([[2, 7], [2, 8]], device=DEVICE))
    assert torch.equal(device, expected)


@pytest.mark.parametrize("src, dst, pairs, message", [
    ((3, 4, 16), (3, 5, 16), [[0, 1]], r"equal planes.*\(3, 4, 16\).*\(3, 5, 16\)"),
    ((3, 4, 16), (3, 4, 16), [[0, 1, 2]], r"pairs must be a contiguous int64 \[N, 2\]"),
])
def test_copy_blocks_rejects_bad_views_naming_them(src, dst, pairs, message):
    with pytest.raises(ValueError, match=message):
        copy_blocks(torch.zeros(src, device=DEVICE), torch.zeros(dst, device=DEVICE),
                    torch.tensor(pairs, device=DEVICE))


def test_every_kernel_compiles_for_sm80_and_sm90():
    # Under TRITON_INTERPRET the kernels are interpreter wrappers, so compile in a fresh Python
    # without it; it imports this module and runs compile_launcher_configurations.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "import test_kernels_decode as t; t.compile_launcher_configurations()"
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    # 3 configurations x (one pass, partitions, reduce, rope_write_kv) x 2 targets, then
    # 3 automatic partition sizes x (partitions, reduce) x 2 targets, then copy_blocks and
    # add_rms_norm (with and without the add), silu_mul and greedy for SmolLM2 x 2
    assert result.stdout.split() == ["compiled"] * 46


def compile_launcher_configurations() -> None:
    """Compile each kernel configuration the launchers pick for sm_80 and sm_90: both decode
    paths and rope_write_kv, fp16/bf16/fp32 (tf32 or IEEE dots), padded and unpadded head
    dims, and split-K at each partition size the automatic choice gives SmolLM2's shape (9
    heads, 3 kv heads, head dim 64, bf16, blocks of 16) over 8192 tokens, copy_blocks over
    its pools and its layer kernels; print "compiled" per kernel and target."""
    configs = [(torch.float16, 64, 16), (torch.bfloat16, 128, 32), (torch.float32, 80, 8)]
    launches = []
    for dtype, head_dim, block_size in configs:
        query = torch.empty(2, 8, head_dim, dtype=dtype)
        key_cache = torch.empty(4, block_size, 2, head_dim, dtype=dtype)
        for split_k in (False, True):
            launches += decode_launches(query, key_cache, key_cache.clone(),
                                        torch.zeros(2, 4, dtype=torch.int32),
                                        torch.ones(2, dtype=torch.int32), 1.0, query, None,
                                        split_k, TILE_TOKENS)
        qkv = torch.empty(2, (8 + 2 * 2) * head_dim, dtype=dtype)
        half = torch.empty(4, head_dim // 2)
        ids = torch.zeros(2, dtype=torch.int64)
        launches.append(rope_write_kv_launch(qkv, 8, half, half, ids, key_cache,
                                             key_cache.clone(), ids))
    key_cache = torch.empty(4, 16, 3, 64, dtype=torch.bfloat16)
    sizes = []
    for num_seqs in (1, 8, 64):
        query = torch.empty(num_seqs, 9, 64, dtype=torch.bfloat16)
        split = decode_launches(query, key_cache, key_cache.clone(),
                                torch.zeros(num_seqs, 512, dtype=torch.int32),
                                torch.ones(num_seqs, dtype=torch.int32), 1.0, query, None,
                                None, None)
        sizes.append(split[0][2]["PARTITION_SIZE"])
        launches += split
    assert sizes == [MIN_PARTITION_SIZE, 256, PARTITION_SIZE], sizes
    pool = torch.empty(60, 5, 16 * 3 * 64, dtype=torch.bfloat16).transpose(0, 1)
    launches.append(copy_blocks_launch(pool, torch.empty(4, 60, 16 * 3 * 64,
                                                         dtype=torch.bfloat16),
                                       torch.zeros(1, 2, dtype=torch.int64)))
    hidden = torch.empty(4, 576, dtype=torch.bfloat16)
    launches += [add_rms_norm_launch(x, hidden, hidden[0], 1e-5) for x in (hidden, None)]
    launches.append(silu_mul_launch(torch.empty(4, 2 * 1536, dtype=torch.bfloat16)))
    launches.append(greedy_launch(torch.empty(4, 49152, dtype=torch.bfloat16)))
    for capability in (80, 90):
        for kernel, _, args in launches:
            compiled = triton.compile(ASTSource(kernel, *signature(kernel, args)),
                                      target=GPUTarget("cuda", capability, 32))
            assert compiled.asm["cubin"] and compiled.asm["ptx"]
            print("compiled")


def signature(kernel, args: dict) -> tuple[dict, dict]:
    """Triton's ``(signature, constexprs)`` for calling ``kernel`` with ``args``."""
    types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
             torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
    sig, constexprs = {}, {}
    for param in kernel.params:
        value = args[param.name]
        if param.is_constexpr:
            sig[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[param.name] = types[value.dtype]
        else:
            sig[param.name] = "fp32" if isinstance(value, float) else "i32"
    return sig, constexprs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split_k", [None, False], ids=["automatic", "one-pass"])
def test_long_contexts_on_gpu_match_reference(dtype, split_k):
    check_decode([LONG_CONTEXT + 100, 3000, 1, 17, 700], 32, 8, 128, 16, dtype, split_k=split_k)
