"""The ``torch`` attention backend: paged KV writes and attention through block tables.

A step packs the new tokens of all its sequences one after another. Each sequence's context lives
in the KV cache (``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer) at the blocks its
block table names; attention reads K/V only through that table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PrefillRow(NamedTuple):
    """A sequence with several new tokens this step (a prompt, or a chunk of one)."""

    seq: int  # index of the sequence in the batch
    start: int  # index of its first new token in the packed batch
    query_len: int
    seq_len: int  # context length after this step, cached prefix included


@dataclass
class AttentionMetadata:
    """Where one step's new tokens go in the paged KV cache, and what each of them attends to."""

    block_size: int
    positions: Tensor  # [T] int64: position of each new token in its sequence
    slot_mapping: Tensor  # [T] int64: cache slot of each new token, block_id * block_size + offset
    query_start_loc: Tensor  # [S + 1] int64: where each sequence's new tokens start in the batch
    seq_lens: Tensor  # [S] int64: context length of each sequence after this step
    block_tables: Tensor  # [S, max_blocks] int64, padded with block 0 (never read past seq_lens)
    # Sequences with one new token are attended as one batch ...
    decode_tokens: Tensor  # [D] int64: their tokens' indices in the packed batch
    decode_block_tables: Tensor  # [D, blocks of the longest] int64
    decode_seq_lens: Tensor  # [D] int64
    # ... the others one by one.
    prefills: list[PrefillRow]

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed_tokens: list[int], query_lens: list[int],
              block_size: int, device: torch.device | str) -> "AttentionMetadata":
        """Metadata of a step in which sequence ``i`` has ``num_computed_tokens[i]`` tokens cached
        and computes ``query_lens[i]`` new ones; its block table must cover all of them."""
        _check_step(block_tables, num_computed_tokens, query_lens, block_size)
        seq_lens = [c + q for c, q in zip(num_computed_tokens, query_lens)]
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        query_start_loc = F.pad(q_lens.cumsum(0), (1, 0))
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        positions = (torch.arange(int(q_lens.sum())) - query_start_loc[seq_of_token]
                     + torch.tensor(num_computed_tokens, dtype=torch.int64)[seq_of_token])
        tables = _pad(block_tables)
        slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        decode_blocks = -(-max((seq_lens[i] for i in decode), default=0) // block_size)
        prefills = [PrefillRow(i, int(query_start_loc[i]), q, seq_lens[i])
                    for i, q in enumerate(query_lens) if q > 1]
        to = dict(device=device)
        return cls(
            block_size=block_size,
            positions=positions.to(**to),
            slot_mapping=slot_mapping.to(**to),
            query_start_loc=query_start_loc.to(**to),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
            block_tables=tables.to(**to),
            decode_tokens=query_start_loc[decode].to(**to),
            decode_block_tables=tables[decode, :decode_blocks].to(**to),
            decode_seq_lens=torch.tensor([seq_lens[i] for i in decode], dtype=torch.int64, device=device),
            prefills=prefills,
        )

    @property
    def last_token_indices(self) -> Tensor:
        """[S] index of each sequence's last new token in the packed batch (the one to sample from)."""
        return self.query_start_loc[1:] - 1


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write the new tokens' keys and values (``[T, num_kv_heads, head_dim]``) into their cache
    slots; a slot of -1 means "do not store"."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.flatten(0, 1).index_copy_(0, slots, key[keep])
    v_cache.flatten(0, 1).index_copy_(0, slots, value[keep])


def attend(query: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal attention of each new token (``query``: ``[T, num_heads, head_dim]``) over its
    sequence's cached context and the new tokens up to itself. K/V of this step must already be
    written. Query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``."""
    out = torch.empty_like(query)
    if meta.decode_tokens.numel():
        out[meta.decode_tokens] = _decode(query[meta.decode_tokens], k_cache, v_cache,
                                          meta.decode_block_tables, meta.decode_seq_lens, scale)
    for row in meta.prefills:
        rows = slice(row.start, row.start + row.query_len)
        num_blocks = -(-row.seq_len // meta.block_size)
        out[rows] = _prefill(query[rows], k_cache, v_cache, meta.block_tables[row.seq, :num_blocks],
                             row.seq_len, scale)
    return out


def _decode(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
            scale: float) -> Tensor:
    """One new token per sequence, all sequences in one batched op over their gathered blocks."""
    keys = k_cache[block_tables].flatten(1, 2)  # [D, L, kvh, hd]
    values = v_cache[block_tables].flatten(1, 2)
    valid = torch.arange(keys.shape[1], device=keys.device) < seq_lens[:, None]  # [D, L]
    # Slots past a sequence's end hold whatever was there (torch.empty, other tenants, NaN): a
    # masked score alone would still let 0 * NaN through the weighted sum, so zero them.
    keys.masked_fill_(~valid[:, :, None, None], 0)
    values.masked_fill_(~valid[:, :, None, None], 0)
    out = _sdpa(query[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), valid[:, None, None], scale)
    return out.squeeze(2)


def _prefill(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_len: int,
             scale: float) -> Tensor:
    """Several new tokens of one sequence, over its cached prefix and themselves."""
    keys = k_cache[block_table].flatten(0, 1)[:seq_len].transpose(0, 1)  # [kvh, C, hd]
    values = v_cache[block_table].flatten(0, 1)[:seq_len].transpose(0, 1)
    query_len = query.shape[0]
    mask = None
    if False:  # a cached prefix: the causal diagonal is shifted right by its length
        positions = torch.arange(seq_len, device=query.device)
        mask = positions[None, :] <= positions[seq_len - query_len:, None]
    return _sdpa(query.transpose(0, 1), keys, values, mask, scale).transpose(0, 1)


def _sdpa(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """[..., H, q, hd] x [..., kvh, k, hd]; torch's fused kernel keeps softmax sums in float32."""
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=True)


def _pad(block_tables: list[list[int]]) -> Tensor:
    width = max((len(t) for t in block_tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64).view(-1, width)


def _check_step(block_tables: list[list[int]], num_computed_tokens: list[int], query_lens: list[int],
                block_size: int) -> None:
    if not len(block_tables) == len(num_computed_tokens) == len(query_lens):
        raise ValueError(f"a step needs one block table, computed count and query length per sequence; got "
                         f"{len(block_tables)}, {len(num_computed_tokens)} and {len(query_lens)}")
    for i, (table, computed, query_len) in enumerate(zip(block_tables, num_computed_tokens, query_lens)):
        if query_len < 1:
            raise ValueError(f"sequence {i} has query_len {query_len}; every sequence in a step needs >= 1")
        if len(table) * block_size < computed + query_len:
            raise ValueError(f"block table of sequence {i} has {len(table)} blocks of {block_size} slots, "
                             f"too few for its {computed + query_len} tokens")
