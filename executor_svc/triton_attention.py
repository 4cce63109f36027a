"""The ``triton`` attention backend: the paged kernels of ``kernels``.

On CUDA the kernels compile for the device; on CPU tensors they run only in triton's
interpreter (``TRITON_INTERPRET=1``, set before this module is imported): exact but slow,
which is what the tests use.
"""
from __future__ import annotations

from torch import Tensor

from pagedserve import kernels
from pagedserve.executor_svc.attention import AttentionMetadata


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    kernels.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def attend(query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
           meta: AttentionMetadata, scale: float) -> Tensor:
    """``key`` and ``value`` are read from the cache, where they were written. A pure decode
    step (one new token per sequence) takes the decode kernel; a step with prompt tokens
    takes the prefill kernel for all its sequences, decodes included."""
    if meta.max_query_len == 1:
        return kernels.paged_decode_attention(query, k_cache, v_cache, meta.block_tables,
                                              meta.seq_lens, scale, max_seq_len=meta.max_seq_len)
    return kernels.paged_prefill_attention(query, k_cache, v_cache, meta.block_tables,
                                           meta.seq_lens, meta.query_start_loc, scale,
                                           max_query_len=meta.max_query_len)
