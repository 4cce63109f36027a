"""Paged prefill attention in Triton: the new tokens of many sequences over their paged context.

A step packs the new tokens of its sequences one after another; sequence ``i``'s are
``query[query_start_loc[i]:query_start_loc[i + 1]]``. Its whole context, the cached prefix (prefix
caching, earlier chunks of a chunked prefill) and this step's tokens alike, is read through its
block table: rope_write_kv has written the new keys and values before this kernel runs. New
token ``j`` sits at position ``seq_len - query_len + j`` and sees the positions up to its own, so
prompts, prompt chunks and single decode tokens share one launch.

Shapes follow the cache engine: a cache is ``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""
from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# A program's query rows (BLOCK_M: tokens x the query heads of one kv head, in that order),
# context tokens per loop step (BLOCK_N), warps and pipeline stages. On a GPU the kernel
# takes the fastest of _CONFIGS, timed once per model shape and dtype at its first launch
# (triton.autotune; the executor's start-up profiling pass is one); the interpreter runs
# _DEFAULT alone.
_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3),
            (64, 32, 4, 4)]
_DEFAULT = (64, 64, 4, 3)
_MAX_HEAD_DIM = 256
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _prefill_kernel(
        out_ptr, query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
        query_start_loc_ptr, qk_scale,
        stride_out_token, stride_out_head, stride_q_token, stride_q_head,
        stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
        stride_table,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        DOT_DTYPE: tl.constexpr):
    # A program attends BLOCK_M rows of one sequence's new tokens for one kv head: its rows are
    # (token, head) pairs over the GROUP query heads that read the kv head, every head of a
    # token in turn, so each key and value tile is loaded once for the group, and no row is
    # padding while a tile is full (GROUP need not be a power of two).
    seq = tl.program_id(0)
    first_row = tl.program_id(1) * BLOCK_M
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if first_row >= query_len * GROUP:
        return
    context_len = tl.load(seq_lens_ptr + seq) - query_len  # tokens cached before this step

    rows = first_row + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM
    row_mask = (token < query_len)[:, None] & dim_valid[None, :]
    packed_token = (query_start + token).to(tl.int64)[:, None]
    q = tl.load(query_ptr + packed_token * stride_q_token + head[:, None] * stride_q_head
                + dims[None, :], mask=row_mask, other=0.0)
    q_pos = context_len + token

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    # Blocks after the tile's last position are never visited.
    kv_end = context_len + tl.minimum((first_row + BLOCK_M - 1) // GROUP + 1, query_len)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    for start in range(0, kv_end, BLOCK_N):
        kv_pos = start + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < kv_end
        block_id = tl.load(table + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        offset = kv_pos % BLOCK_SIZE
        k_token = block_id * stride_k_block + offset * stride_k_slot + kv_head * stride_k_head
        v_token = block_id * stride_v_block + offset * stride_v_slot + kv_head * stride_v_head
        k_t = tl.load(key_cache_ptr + k_token[None, :] + dims[:, None],
                      mask=dim_valid[:, None] & kv_valid[None, :], other=0.0)  # [dims, BLOCK_N]
        v = tl.load(value_cache_ptr + v_token[:, None] + dims[None, :],
                    mask=kv_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_N, dims]
        # fp32 inputs get fp32 dots: tf32 would cost three decimal digits.
        scores = tl.dot(q.to(DOT_DTYPE), k_t.to(DOT_DTYPE), input_precision="ieee") * qk_scale
        # Causal: a row sees positions up to its own. That also hides the positions past kv_end
        # from every row that is stored.
        scores = tl.where(kv_pos[None, :] <= q_pos[:, None], scores, float("-inf"))
        # Online softmax in base 2 (qk_scale carries log2 e). Column 0 is visible to every row,
        # so m_i is finite from the first step on and exp2(-inf - m) is a clean 0.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE),
                                            input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + packed_token * stride_out_token + head[:, None] * stride_out_head
             + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask)


def paged_prefill_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                            block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                            scale: float, max_query_len: int | None = None,
                            out: Tensor | None = None,
                            config: tuple[int, int, int, int] | None = None) -> Tensor:
    """Causal attention of the packed new tokens over their sequences' paged context.

    ``query`` is ``[num_tokens, num_heads, head_dim]`` (fp32, fp16 or bf16), sequence ``i``'s new
    tokens at ``query_start_loc[i]:query_start_loc[i + 1]``. The caches are ``[num_blocks,
    block_size, num_kv_heads, head_dim]`` in the query's dtype and already hold this step's keys
    and values. ``block_tables`` (``[num_seqs, max_blocks]``), ``seq_lens`` (``[num_seqs]``,
    context length after this step) and ``query_start_loc`` (``[num_seqs + 1]``) are int32 or
    int64 on the query's device; their values are trusted, as checking them would cost a device
    sync. Query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.

    ``max_query_len`` must be at least the longest query length (tokens of longer ones are left
    unwritten); None reads it from ``query_start_loc``, at the cost of a sync. ``out`` is written
    in place when given. ``config`` (one of ``_CONFIGS``) fixes the tile instead of the
    fastest one timed here. Returns ``[num_tokens, num_heads, head_dim]`` in the query's
    dtype.
    """
    out = torch.empty_like(query) if out is None else out
    _check_shapes(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    _check_layout(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    num_seqs, (num_tokens, num_heads, head_dim) = len(seq_lens), query.shape
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    constants = _kernel_constants(num_heads, num_kv_heads, head_dim, block_size, query.dtype)
    rows = max_query_len * constants["GROUP"]
    args = (out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
            scale * math.log2(math.e),
            out.stride(0), out.stride(1), query.stride(0), query.stride(1),
            *key_cache.stride()[:3], *value_cache.stride()[:3], block_tables.stride(0))
    if _tuned is None or config is not None:
        block_m, block_n, warps, stages = config or _DEFAULT
        grid = (num_seqs, triton.cdiv(rows, block_m), num_kv_heads)
        _prefill_kernel[grid](*args, **constants, BLOCK_M=block_m, BLOCK_N=block_n,
                              num_warps=warps, num_stages=stages)
    else:
        _tuned[lambda meta: (num_seqs, triton.cdiv(rows, meta["BLOCK_M"]), num_kv_heads)](
            *args, **constants)
    return out


def _kernel_constants(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                      dtype: torch.dtype) -> dict:
    """The kernel's compile-time parameters for one model and cache layout, but the tile's
    (BLOCK_M, BLOCK_N: a config's)."""
    # The interpreter multiplies bf16 as raw 16-bit integers, so there its dots run in fp32.
    dot_dtype = tl.float32 if _interpreted and dtype == torch.bfloat16 else _TL_DTYPES[dtype]
    return {"GROUP": num_heads // num_kv_heads, "HEAD_DIM": head_dim,
            "HEAD_DIM_P": max(16, triton.next_power_of_2(head_dim)), "BLOCK_SIZE": block_size,
            "DOT_DTYPE": dot_dtype}


def _autotuned(kernel):
    """``kernel`` timed over ``_CONFIGS`` at its first launch per model shape and dtype (the
    tensors' dtypes join the key), the choice kept in triton's cache where this triton can."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _CONFIGS]
    keep = {"cache_results": True} if "cache_results" in inspect.signature(
        triton.autotune).parameters else {}
    return triton.autotune(configs, key=["GROUP", "HEAD_DIM", "BLOCK_SIZE"], **keep)(kernel)


_interpreted = isinstance(_prefill_kernel, InterpretedFunction)
_tuned = None if _interpreted else _autotuned(_prefill_kernel)


def _check_shapes(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim]; got shape "
                         f"{tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must both be [num_blocks, block_size, "
                         f"num_kv_heads, head_dim]; got shapes {tuple(key_cache.shape)} and "
                         f"{tuple(value_cache.shape)}")
    num_heads, head_dim = query.shape[1:]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"the caches' head_dim {key_cache.shape[3]} differs from the query's "
                         f"{head_dim}")
    if not 0 < head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported; it must be 1 to {_MAX_HEAD_DIM}")
    if num_heads % key_cache.shape[2]:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                         f"{key_cache.shape[2]}")
    if seq_lens.dim() != 1 or block_tables.dim() != 2 or block_tables.shape[0] != len(seq_lens):
        raise ValueError(f"block_tables must be [num_seqs, max_blocks] and seq_lens [num_seqs]; "
                         f"got shapes {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    num_seqs = len(seq_lens)
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}]; got shape "
                         f"{tuple(query_start_loc.shape)}")
    if out.shape != query.shape:
        raise ValueError(f"out must have the query's shape {tuple(query.shape)}; got "
                         f"{tuple(out.shape)}")


def _check_layout(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out):
    if query.dtype not in _TL_DTYPES:
        raise ValueError(f"query dtype {query.dtype} is not supported; use one of "
                         f"{list(_TL_DTYPES)}")
    tensors = {"query": query, "key_cache": key_cache, "value_cache": value_cache, "out": out,
               "block_tables": block_tables, "seq_lens": seq_lens,
               "query_start_loc": query_start_loc}
    for name, tensor in tensors.items():
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, the query on {query.device}")
    for name in ("key_cache", "value_cache", "out"):
        if tensors[name].dtype != query.dtype:
            raise ValueError(f"{name} dtype {tensors[name].dtype} differs from the query's "
                             f"{query.dtype}")
    for name in ("block_tables", "seq_lens", "query_start_loc"):
        if tensors[name].dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} dtype {tensors[name].dtype} is not int32 or int64")
    for name in ("query", "key_cache", "value_cache", "out", "block_tables"):
        if tensors[name].stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension; got strides "
                             f"{tensors[name].stride()}")
