"""The CPU attention backends (the compiled kernel's and torch's) against the float64
references in ``kernels``."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.executor_svc import cpu_build, cpu_kernels
from pagedserve.executor_svc.attention import StepLayout
from pagedserve.executor_svc.backends import attention_backend
from pagedserve.executor_svc.backends.cpu import CpuBackend
from pagedserve.executor_svc.backends.torch import TorchBackend, write_kv
from pagedserve.kernels import (bf16_attention_tolerance, paged_attention_reference,
                               reshape_and_cache_reference)

HEAD_DIM = 8
BLOCK_SIZE = 4
# (num_computed_tokens, query_len) per sequence, in batch order: decode rows with contexts of 1,
# block_size - 1, block_size, block_size + 1 and many blocks, between prompts with and without a
# cached prefix.
MIXED_BATCH = [(0, 1), (2, 1), (0, 7), (3, 1), (BLOCK_SIZE + 1, 6), (4, 1), (37, 1), (7, 2), (0, 1)]


def slot(table: list[int], position: int, block_size: int) -> int:
    return table[position // block_size] * block_size + position % block_size


def chosen(block_size, null_block, dtype, kv_dtype):
    """The backend an executor chooses here for ``--attention-backend torch``."""
    return attention_backend("torch", block_size, "cpu", dtype, kv_dtype, null_block)


def kernel(block_size, null_block, dtype, kv_dtype):
    return CpuBackend(block_size)


def gathered(block_size, null_block, dtype, kv_dtype):
    return TorchBackend(block_size, "cpu", null_block)


def run_step(rows, num_heads, num_kv_heads, dtype, block_size=BLOCK_SIZE, seed=0,
             query_in_qkv=False, kv_dtype=None, head_dim=HEAD_DIM, backend=chosen):
    """Fill each sequence's cached prefix, write the new tokens with ``write_kv`` and attend
    with the backend ``backend(block_size, null_block, dtype, kv_dtype)`` makes. Returns our
    output and cache, and the reference's. ``query_in_qkv``: the query is a view of wider
    rows, as the model's is of the q/k/v projection's output. ``kv_dtype``: the caches'
    dtype, if not ``dtype`` (the reference reads the values they hold). The reference's last
    is its output over the values' magnitudes (``bf16_attention_tolerance``)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in rows]
    blocks_needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks that nobody writes
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[pool.pop() for _ in range(n)] for n in blocks_needed]
    null_block = num_blocks  # zeros, after the blocks: pads the decode rows' tables
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.full(shape, float("nan"), dtype=kv_dtype or dtype)
                        for _ in range(2))
    k_cache[null_block] = v_cache[null_block] = 0
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for n in seq_lens]
    for table, (computed, _), k, v in zip(tables, rows, keys, values):
        prefix_slots = torch.tensor([slot(table, p, block_size) for p in range(computed)],
                                    dtype=torch.int64)
        reshape_and_cache_reference(k[:computed], v[:computed], k_cache, v_cache, prefix_slots)

    query_lens = [q for _, q in rows]
    attention = backend(block_size, null_block, dtype, kv_dtype or dtype)
    meta = attention.build(tables, [c for c, _ in rows], query_lens)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, rows)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, rows)])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reshape_and_cache_reference(new_k, new_v, ref_k, ref_v, meta.slot_mapping)
    write_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)

    width = num_heads + 2 * num_kv_heads if query_in_qkv else num_heads
    query = torch.randn(len(new_k), width, head_dim, generator=g).to(dtype)[:, :num_heads]
    scale = head_dim ** -0.5
    k_cache, v_cache = attention.from_rows(k_cache, v_cache, dtype)  # the layout it keeps
    out = attention.attend(query, new_k, new_v, k_cache, v_cache, meta, scale)
    k_cache, v_cache = attention.to_rows(k_cache, v_cache, dtype)
    ref = paged_attention_reference(query, ref_k, ref_v, tables, seq_lens, query_lens, scale)
    weighted_abs = paged_attention_reference(query, ref_k, ref_v.abs(), tables, seq_lens,
                                             query_lens, scale)
    return (out, k_cache, v_cache), (ref, ref_k, ref_v, weighted_abs)


@pytest.fixture(params=["kernel", "gathered"])
def decode_path(request):
    """Decode rows through the compiled CPU kernel (as served by default) or gathered: the
    backend to pass to ``run_step``."""
    if request.param == "kernel" and cpu_kernels.load() is None:
        pytest.skip("the CPU decode kernel did not build here (no C compiler?)")
    return {"kernel": kernel, "gathered": gathered}[request.param]


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (4, 4), (8, 1)],
                         ids=["gqa", "mha", "mqa"])
def test_mixed_decode_and_prefill_batch_matches_reference_fp32(num_heads, num_kv_heads,
                                                               decode_path):
    ours, reference = run_step(MIXED_BATCH, num_heads, num_kv_heads, torch.float32,
                               backend=decode_path)
    (out, k_cache, v_cache), (ref, ref_k, ref_v, _) = ours, reference
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0, equal_nan=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# A float32 model over a bfloat16 cache (--kv-cache-dtype bfloat16): K/V are stored rounded,
# and attention reads those values in float32. The kernel widens a span of one kv head's K/V
# at a time into float32 buffers where it fits 8192 floats (blocks of 16 or 32 x 128 dims),
# and reads the cache in place where not (64 x 256).
@pytest.mark.parametrize("rows", [MIXED_BATCH, [(0, 150), (70, 33), (5, 1), (100, 1)]],
                         ids=["mixed", "long"])
@pytest.mark.parametrize("block_size, head_dim", [(16, 8), (32, 128), (64, 256)])
def test_bfloat16_cache_under_float32_queries_matches_reference(rows, block_size, head_dim,
                                                                decode_path):
    ours, reference = run_step(rows, 6, 3, torch.float32, block_size=block_size, seed=5,
                               query_in_qkv=True, kv_dtype=torch.bfloat16, head_dim=head_dim,
                               backend=decode_path)
    (out, k_cache, v_cache), (ref, ref_k, ref_v, _) = ours, reference
    assert k_cache.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_mixed_batch_matches_reference_bf16(num_heads, num_kv_heads, decode_path):
    (out, *_), (ref, *_) = run_step(MIXED_BATCH, num_heads, num_kv_heads, torch.bfloat16,
                                    backend=decode_path)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)


# A bf16 model: bfloat16 queries read in place from the q/k/v projection's output, over a
# bfloat16 cache (widened a span at a time, or read in place) or a float32 one. The kernel's
# softmax and sums are float32: the output is within its own rounding to bfloat16; where the
# build takes bf16 dot products (AVX512_BF16) over a bf16 cache, within the rounding of the
# probabilities to bf16 too.
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [MIXED_BATCH, [(0, 150), (70, 33), (5, 1), (100, 1)]],
                         ids=["mixed", "long"])
@pytest.mark.parametrize("block_size, head_dim", [(16, 8), (16, 64), (64, 256)])
def test_bfloat16_queries_in_the_kernel_match_reference(rows, block_size, head_dim, kv_dtype):
    if cpu_kernels.load() is None:
        pytest.skip("the CPU decode kernel did not build here (no C compiler?)")
    ours, reference = run_step(rows, 6, 3, torch.bfloat16, block_size=block_size, seed=6,
                               query_in_qkv=True, kv_dtype=kv_dtype, head_dim=head_dim,
                               backend=kernel)
    (out, k_cache, _), (ref, *_, weighted_abs) = ours, reference
    assert out.dtype == torch.bfloat16 and k_cache.dtype == kv_dtype
    if kv_dtype == torch.bfloat16 and head_dim % 32 == 0 and \
            cpu_kernels.load().attention_bf16_products():
        # bf16 dot products: the probabilities are rounded to bf16 too (as torch's are)
        assert ((out.double() - ref).abs() <= bf16_attention_tolerance(weighted_abs, ref)).all()
    else:
        torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-5)


# SmolLM2's shape in a bf16 model: each load of a kv head's K and V serves its three query
# heads together (and a group of 5 serves four, then one), over prompts of several spans.
@pytest.mark.parametrize("num_heads", [9, 15])
def test_bfloat16_model_query_groups_match_reference(num_heads):
    if cpu_kernels.load() is None:
        pytest.skip("the CPU decode kernel did not build here (no C compiler?)")
    rows = [(0, 300), (40, 90), (7, 1), (250, 1)]
    (out, *_), (ref, *_, weighted_abs) = run_step(
        rows, num_heads, 3, torch.bfloat16, block_size=16, seed=7, query_in_qkv=True,
        head_dim=64, backend=kernel)
    if cpu_kernels.load().attention_bf16_products():
        assert ((out.double() - ref).abs() <= bf16_attention_tolerance(weighted_abs, ref)).all()
    else:
        torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-5)


# The fixture only chooses the decode path: the same choice serves every example.
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6)), min_size=1, max_size=6),
       block_size=st.sampled_from([1, 3, 4, 16]), seed=st.integers(0, 2**16),
       num_heads=st.sampled_from([2, 6]), query_in_qkv=st.booleans(),
       kv_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_batch_matches_reference(rows, block_size, seed, num_heads, query_in_qkv,
                                     kv_dtype, decode_path):
    (out, *_), (ref, *_) = run_step(rows, num_heads, 2, torch.float32, block_size=block_size,
                                    seed=seed, query_in_qkv=query_in_qkv, kv_dtype=kv_dtype,
                                    backend=decode_path)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# Enough decode rows that the kernel hands out whole sequences (with few, it splits each
# sequence by kv head to keep every thread busy): contexts over several spans of 64 slots.
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (6, 3), (8, 1)],
                         ids=["gqa", "gqa3", "mqa"])
@pytest.mark.parametrize("block_size", [3, 16])
def test_many_decode_rows_match_reference(num_heads, num_kv_heads, block_size, decode_path):
    rows = [(context, 1) for context in (0, 5, 63, 64, 65, 130, 7, 200, 16, 31, 99, 1)]
    (out, *_), (ref, *_) = run_step(rows, num_heads, num_kv_heads, torch.float32,
                                    block_size=block_size, seed=3, backend=decode_path)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# Prompts over several query tiles (16 rows) and spans (64 slots), alone and after a cached
# prefix, beside decode rows: one kernel call on the CPU.
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (8, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("block_size", [3, 16])
def test_long_prompts_match_reference(num_heads, num_kv_heads, block_size, decode_path):
    rows = [(0, 150), (70, 33), (5, 1), (0, 17), (100, 1)]
    (out, *_), (ref, *_) = run_step(rows, num_heads, num_kv_heads, torch.float32,
                                    block_size=block_size, seed=4, query_in_qkv=True,
                                    backend=decode_path)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_kernel_is_cached_per_machine_and_rebuilt_into_a_fresh_cache(tmp_path, monkeypatch):
    if cpu_kernels.load() is None:
        pytest.skip("the CPU decode kernel did not build here (no C compiler?)")
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("PAGEDSERVE_KERNELS_DIR", raising=False)
    forget_the_loaded_kernels()
    try:
        assert cpu_kernels.load() is not None
        [built] = (tmp_path / "kernels").iterdir()
        assert built.name.startswith("cpu_kernels-") and built.suffix == ".so"
    finally:
        forget_the_loaded_kernels()


def test_without_a_compiler_decode_takes_the_gathered_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))  # no build made before is found
    monkeypatch.delenv("PAGEDSERVE_KERNELS_DIR", raising=False)
    monkeypatch.setattr(cpu_build.tempfile, "gettempdir", lambda: str(tmp_path))
    forget_the_loaded_kernels()
    try:
        assert cpu_kernels.load() is None
        assert isinstance(chosen(BLOCK_SIZE, 0, torch.float32, torch.float32), TorchBackend)
        (out, *_), (ref, *_) = run_step(MIXED_BATCH, 4, 2, torch.float32)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    finally:
        forget_the_loaded_kernels()


def forget_the_loaded_kernels() -> None:
    """The next ``cpu_kernels.load()`` finds (or builds) and loads a build anew."""
    cpu_build.load.cache_clear()
    cpu_kernels.load.cache_clear()


def test_decode_rows_are_one_batch_and_prefill_rows_go_one_by_one():
    meta = TorchBackend(4, "cpu", null_block=9).build([[3, 6], [1, 2], [0], [5]], [4, 3, 0, 0],
                                                      [1, 2, 1, 3])
    assert meta.decode_tokens.tolist() == [0, 3]
    assert meta.decode_tables.tolist() == [[3, 6], [0, 9]]  # padded with the null block
    assert meta.decode_mask.tolist() == [[True] * 5 + [False] * 3, [True] + [False] * 7]
    assert meta.decode_last.tolist() == [1, 0]
    assert meta.decode_tail.tolist() == [[False, True, True, True], [False, True, True, True]]
    cached, fresh = meta.prefills
    assert (cached.start, cached.query_len, cached.context_len) == (1, 2, 5)
    assert cached.context_blocks.tolist() == [1, 2]
    assert cached.mask.tolist() == [[True] * 4 + [False], [True] * 5]  # 3 cached, then causal
    assert (fresh.start, fresh.query_len, fresh.context_blocks, fresh.mask) == (4, 3, None, None)


def test_decode_rows_of_different_lengths_need_a_null_block():
    with pytest.raises(ValueError, match="need a null_block"):
        TorchBackend(4, "cpu").build([[3, 6], [0]], [4, 0], [1, 1])


@pytest.mark.parametrize("backend", [kernel, gathered], ids=["kernel", "gathered"])
def test_slots_and_positions_follow_the_block_table(backend):
    layout = StepLayout.build([[7, 2], [5]], [3, 0], [3, 2], 4)
    meta = backend(4, None, torch.float32, torch.float32).build([[7, 2], [5]], [3, 0], [3, 2])
    for step in (layout, meta):
        assert step.positions.tolist() == [3, 4, 5, 0, 1]
        assert step.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 0,
                                              5 * 4 + 1]
        assert step.slot_mapping.dtype == torch.int64
    assert layout.seq_lens.tolist() == [6, 2]
    assert meta.last_token_indices.tolist() == [2, 4]


def test_block_table_too_short_is_rejected():
    with pytest.raises(ValueError, match="sequence 1 has 1 blocks of 4 slots, too few for its 5"):
        StepLayout.build([[0, 1], [2]], [0, 4], [5, 1], 4)


def test_write_kv_matches_reference_and_skips_slot_minus_one():
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 5, 2, HEAD_DIM, generator=g)
    caches = [torch.full((3, 4, 2, HEAD_DIM), float("nan")) for _ in range(4)]
    slots = torch.tensor([9, -1, 0, 4, -1])
    write_kv(key, value, caches[0], caches[1], slots)
    reshape_and_cache_reference(key, value, caches[2], caches[3], slots)
    for ours, ref in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(caches[0][2, 1], key[0]) and torch.equal(caches[1][1, 0], value[3])
    assert int((~caches[0].isnan()).any(-1).any(-1).sum()) == 3  # only three slots were written
