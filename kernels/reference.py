"""Float64 references for the paged attention kernels: slow, obvious, and the ground truth in tests.

Shapes follow the cache engine: a cache is ``[num_blocks, block_size, num_kv_heads, head_dim]``,
and the new tokens of all sequences are packed one after another (``[T, heads, head_dim]``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def reshape_and_cache_reference(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                                slot_mapping: Tensor) -> None:
    """Write token ``t``'s key and value into slot ``slot_mapping[t]`` of the caches; skip -1."""
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block_id, offset = divmod(slot, block_size)
        key_cache[block_id, offset] = key[t]
        value_cache[block_id, offset] = value[t]


def paged_attention_reference(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                              block_tables: Tensor | list[list[int]], seq_lens: Tensor | list[int],
                              query_lens: Tensor | list[int], scale: float) -> Tensor:
    """Attention of the packed new tokens over their sequences' paged context, in float64.

    Sequence ``i`` has ``seq_lens[i]`` tokens in the cache after this step, the last
    ``query_lens[i]`` of them new; a new token sees the context up to and including itself. Query
    head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``. Returns ``[T, num_heads,
    head_dim]`` in float64.
    """
    block_tables, seq_lens, query_lens = (_as_list(x) for x in (block_tables, seq_lens, query_lens))
    num_heads, group = query.shape[1], query.shape[1] // key_cache.shape[2]
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    start = 0
    for table, seq_len, query_len in zip(block_tables, seq_lens, query_lens):
        keys = _gather(key_cache, table, seq_len)
        values = _gather(value_cache, table, seq_len)
        for h in range(num_heads):
            q = query[start:start + query_len, h].double()
            scores = q @ keys[:, h // group].T * scale
            # new token j sits at position seq_len - query_len + j
            query_positions = torch.arange(seq_len - query_len, seq_len)
            visible = torch.arange(seq_len)[None, :] <= query_positions[:, None]
            scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
            out[start:start + query_len, h] = scores.softmax(-1) @ values[:, h // group]
        start += query_len
    return out


def bf16_attention_tolerance(weighted_abs: Tensor, reference: Tensor) -> Tensor:
    """How far a bf16 attention output may lie from ``reference`` (float64) where its
    probabilities are rounded to bf16 before they weigh the values (as torch's bf16 flash
    attention and the CPU kernel's bf16 dot products do): each probability by 2^-9 of itself,
    so the sum by 2^-9 of ``weighted_abs`` (the reference run over the values' magnitudes),
    and the output's own rounding by 2^-9 of it; twice both, for the float32 sums."""
    return 2 ** -8 * (weighted_abs + reference.abs()) + 1e-5


def _gather(cache: Tensor, table: list[int], seq_len: int) -> Tensor:
    """The first ``seq_len`` tokens of a sequence, read block by block through its table."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = [cache[block_id] for block_id in table[:num_blocks]]
    return torch.cat(blocks)[:seq_len].double()


def _as_list(x):
    return x.tolist() if isinstance(x, Tensor) else list(x)
