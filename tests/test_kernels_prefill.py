"""The Triton paged prefill kernel against the float64 reference in ``kernels``.

Without a GPU the kernel runs in triton's interpreter on CPU tensors (see conftest.py), and a
subprocess compiles it for sm_80 and sm_90 with triton's own compiler. With a GPU the same
specifications run compiled on it, and the long-context ones marked ``requires_cuda`` join them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from triton.backends.compiler import GPUTarget

from pagedserve.kernels import paged_attention_reference
from pagedserve.kernels.prefill import (_CONFIGS, _DEFAULT, _kernel_constants, _prefill_kernel,
                                        paged_prefill_attention)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-6},
              torch.float16: {"rtol": 2e-3, "atol": 2e-3},
              torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}
TESTS = Path(__file__).resolve().parent
# The interpreter's tile on both architectures; every tile a GPU may choose, for sm_90 in
# SmolLM2's shape (bf16, head_dim 64, 3 query heads a kv head).
COMPILE_CASES = [*((arch, dtype, head_dim, 8, _DEFAULT)
                   for arch in (80, 90) for dtype, head_dim in (("fp16", 64), ("bf16", 128))),
                 *((90, "bf16", 64, 9, config) for config in _CONFIGS if config != _DEFAULT)]


class Step(NamedTuple):
    """One step's kernel inputs on ``DEVICE``, and the float64 reference output for them."""

    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    scale: float
    expected: Tensor


def make_step(rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0) -> Step:
    """A step in which sequence ``i`` has ``rows[i] = (num_computed_tokens, query_len)``: random
    keys and values for all its tokens in blocks drawn at random from the pool; every slot nobody
    wrote, spare blocks and table padding included, holds NaN so that reading one shows."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [computed + query_len for computed, query_len in rows]
    query_lens = [query_len for _, query_len in rows]
    blocks_needed = [-(-seq_len // block_size) for seq_len in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[pool.pop() for _ in range(n)] for n in blocks_needed]
    padded = [table + pool[:1] * (max(blocks_needed) - len(table)) for table in tables]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = (torch.full(shape, float("nan"), dtype=dtype) for _ in range(2))
    for table, seq_len in zip(tables, seq_lens):
        positions = torch.arange(seq_len)
        slots = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        for cache in key_cache, value_cache:
            values = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
            cache.flatten(0, 1)[slots] = values.to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(query, key_cache, value_cache, tables, seq_lens,
                                         query_lens, scale)
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0)
    return Step(query.to(DEVICE), key_cache.to(DEVICE), value_cache.to(DEVICE),
                torch.tensor(padded, dtype=torch.int32, device=DEVICE),
                torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                query_start_loc.to(torch.int32).to(DEVICE), scale, expected)


def attend(step: Step, **kwargs) -> Tensor:
    """The kernel's output for ``step``, written into a NaN-poisoned ``out`` so that an element it
    leaves unwritten fails the comparison. The interpreter's tile unless ``config`` says
    otherwise (None: the fastest timed on the GPU), so that a GPU does not time every
    shape here."""
    out = torch.full_like(step.query, float("nan"))
    kwargs.setdefault("config", _DEFAULT)
    result = paged_prefill_attention(*step[:-1], out=out, **kwargs)
    assert result is out
    return out


def assert_matches_reference(step: Step, **kwargs) -> None:
    out = attend(step, **kwargs)
    assert out.dtype == step.query.dtype
    torch.testing.assert_close(out.cpu().double(), step.expected.cpu(),
                               **TOLERANCES[step.query.dtype])


def tile_len(num_heads: int, num_kv_heads: int) -> int:
    """New tokens a program's rows reach into (the interpreter's tile): its rows are (token,
    head) pairs, so where the group does not divide them a token's heads span two programs."""
    return -(-_DEFAULT[0] // (num_heads // num_kv_heads))


def mixed_batch(block_size: int, tile: int) -> list[tuple[int, int]]:
    """(num_computed_tokens, query_len) per sequence: cached prefixes of 0, 1, block_size - 1,
    block_size, block_size + 1 and several blocks; decode rows (query_len 1) between prompts
    shorter than a tile, longer than one and longer than two."""
    return [(0, tile + 3), (1, 1), (block_size - 1, tile - 1), (block_size, 1),
            (block_size + 1, 2 * tile + 1), (3 * block_size + 5, 2), (2 * block_size, 1)]


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size",
                         [(8, 2, 64, 16), (9, 3, 64, 16), (4, 1, 80, 8), (2, 2, 128, 32)],
                         ids=["gqa-d64-b16", "gqa3-d64-b16", "mqa-d80-b8", "mha-d128-b32"])
def test_mixed_batch_matches_reference_fp32(num_heads, num_kv_heads, head_dim, block_size):
    tile = tile_len(num_heads, num_kv_heads)
    step = make_step(mixed_batch(block_size, tile), num_heads, num_kv_heads, head_dim, block_size,
                     torch.float32)
    assert_matches_reference(step)


@pytest.mark.parametrize("dtype, num_heads, num_kv_heads, head_dim, block_size",
                         [(torch.float16, 8, 2, 128, 8), (torch.bfloat16, 4, 1, 80, 32)],
                         ids=["fp16-gqa-d128-b8", "bf16-mqa-d80-b32"])
def test_mixed_batch_matches_reference_half_precision(dtype, num_heads, num_kv_heads, head_dim,
                                                      block_size):
    tile = tile_len(num_heads, num_kv_heads)
    rows = mixed_batch(block_size, tile)
    step = make_step(rows, num_heads, num_kv_heads, head_dim, block_size, dtype)
    assert_matches_reference(step, max_query_len=max(query_len for _, query_len in rows))


def test_batch_of_single_tokens_matches_reference():
    step = make_step([(0, 1), (15, 1), (16, 1), (47, 1)], 8, 2, 64, 16, torch.float32)
    assert_matches_reference(step)


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=4),
       heads=st.sampled_from([(4, 2), (2, 2), (4, 1), (6, 2)]),
       block_size=st.sampled_from([8, 16, 32]),
       seed=st.integers(0, 2**16))
def test_any_batch_matches_reference(rows, heads, block_size, seed):
    assert_matches_reference(make_step(rows, *heads, 64, block_size, torch.float32, seed=seed))


def test_query_may_be_a_view_into_a_fused_qkv_projection():
    step = make_step([(5, 7), (0, 1)], 4, 2, 64, 8, torch.float32)
    qkv = torch.randn(len(step.query), (4 + 2 * 2) * 64, device=DEVICE)
    query = qkv[:, :4 * 64].view(step.query.shape)
    query.copy_(step.query)
    assert_matches_reference(step._replace(query=query))


def test_empty_batch_gives_empty_output():
    step = make_step([(3, 2)], 4, 2, 64, 8, torch.float32)
    empty = step._replace(query=step.query[:0], block_tables=step.block_tables[:0],
                          seq_lens=step.seq_lens[:0], query_start_loc=step.query_start_loc[:1])
    assert attend(empty).shape == (0, 4, 64)


@pytest.mark.parametrize("change, message", [
    (lambda s: {"query": s.query[:, :3]}, "num_heads 3 is not a multiple of num_kv_heads 2"),
    (lambda s: {"key_cache": s.key_cache[..., :32], "value_cache": s.value_cache[..., :32]},
     "the caches' head_dim 32 differs from the query's 64"),
    (lambda s: {"query_start_loc": s.query_start_loc[:-1]},
     r"query_start_loc must be \[num_seqs \+ 1\] = \[2\]; got shape \(1,\)"),
    (lambda s: {"query": s.query.double()}, "query dtype torch.float64 is not supported"),
    (lambda s: {"value_cache": s.value_cache.half()},
     "value_cache dtype torch.float16 differs from the query's torch.float32"),
    (lambda s: {"block_tables": s.block_tables.float()},
     "block_tables dtype torch.float32 is not int32 or int64"),
    (lambda s: {"key_cache": s.key_cache.transpose(2, 3).contiguous().transpose(2, 3)},
     "key_cache must be contiguous in its last dimension"),
], ids=["heads", "head-dim", "query-start-loc", "dtype", "cache-dtype", "table-dtype", "stride"])
def test_bad_inputs_are_rejected_naming_the_value(change, message):
    step = make_step([(3, 2)], 4, 2, 64, 8, torch.float32)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(*step._replace(**change(step))[:-1])


def compile_kernel(arch: int, dtype: str, head_dim: int, num_heads: int, config: tuple) -> dict:
    """Compile the kernel for CUDA ``sm_<arch>`` with triton's compiler, which needs no GPU,
    ``num_heads`` over 2 or 3 kv heads, with a config of ``_CONFIGS``. Returns the ptx
    ``.target`` and the cubin's size. Needs TRITON_INTERPRET unset at import."""
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    block_m, block_n, warps, stages = config
    constants = {**_kernel_constants(num_heads, 2 if num_heads % 3 else 3, head_dim, 16,
                                     torch_dtype), "BLOCK_M": block_m, "BLOCK_N": block_n}
    types = {"qk_scale": "fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
             "query_start_loc_ptr": "*i32"}
    signature = {name: "constexpr" if name in constants
                 else types.get(name, f"*{dtype}" if name.endswith("_ptr") else "i32")
                 for name in _prefill_kernel.arg_names}
    source = triton.compiler.ASTSource(fn=_prefill_kernel, signature=signature,
                                       constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return {"target": re.search(r"\.target\s+(\w+)", compiled.asm["ptx"]).group(1),
            "cubin_bytes": len(compiled.asm["cubin"])}


def test_kernel_compiles_for_sm80_and_sm90_without_a_gpu(tmp_path):
    # Under TRITON_INTERPRET the kernel is an interpreter wrapper, which triton cannot compile:
    # compile in a fresh process without it, with a cache of its own.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(TESTS))
    script = ("import json, test_kernels_prefill as t; "
              "print(json.dumps([t.compile_kernel(*case) for case in t.COMPILE_CASES]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=TESTS.parent, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    compiled = json.loads(result.stdout.splitlines()[-1])
    for (arch, *_), kernel in zip(COMPILE_CASES, compiled, strict=True):
        assert kernel["target"].startswith(f"sm_{arch}") and kernel["cubin_bytes"] > 0


@requires_cuda
@pytest.mark.parametrize("dtype, num_heads, num_kv_heads, head_dim, block_size", [
    (torch.bfloat16, 32, 8, 128, 16), (torch.float16, 16, 1, 64, 32),
    (torch.float32, 12, 12, 80, 8)],
    ids=["bf16-gqa-d128-b16", "fp16-mqa-d64-b32", "fp32-mha-d80-b8"])
def test_long_prompts_and_prefixes_match_reference_on_gpu(dtype, num_heads, num_kv_heads,
                                                          head_dim, block_size):
    rows = [(0, 700), (1000, 300), (37, 1), (2000, 1), (513, 129), (block_size * 40, 64)]
    assert_matches_reference(make_step(rows, num_heads, num_kv_heads, head_dim, block_size, dtype))


@pytest.mark.parametrize("config", [*_CONFIGS, None], ids=[*map(str, _CONFIGS), "tuned"])
def test_every_tile_a_gpu_may_choose_matches_reference(config):
    """SmolLM2's shape (3 query heads a kv head: a token's heads span two programs' rows),
    bf16, prompts and prefixes across tiles' edges, with each config and (None) the choice
    timed on a GPU; shorter prompts in the interpreter."""
    rows = ([(0, 700), (1000, 300), (37, 1), (513, 129), (16 * 40, 64), (5, 43)]
            if DEVICE == "cuda" else [(0, 70), (40, 30), (37, 1), (5, 43)])
    assert_matches_reference(make_step(rows, 9, 3, 64, 16, torch.bfloat16), config=config)
