"""Attention over the paged KV cache: the per-step metadata, the backends, and the ``torch``
backend itself.

A step packs the new tokens of all its sequences one after another. Each sequence's context lives
in the KV cache (``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer) at the blocks its
block table names; attention reads K/V only through that table. The metadata turns tables into
cache slots (``block_id * block_size + offset``) once per step, and every layer reuses them.
Two backends share that interface: ``torch`` (gathers and torch's fused attention; the fast path
on CPU) and ``triton`` (the paged kernels of ``kernels``; the path on CUDA).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class AttentionBackend(NamedTuple):
    """How the model writes new K/V into the cache and attends over it."""

    name: str
    write_kv: Callable[..., None]  # (key, value, k_cache, v_cache, slot_mapping)
    attend: Callable[..., Tensor]  # (query, k_cache, v_cache, meta, scale) -> [T, heads, dim]


BACKENDS = ("torch", "triton")


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; ``triton`` imports triton and the kernels only when asked."""
    if name == "torch":
        return AttentionBackend("torch", write_kv, attend)
    if name == "triton":
        from executor_svc import triton_attention
        return AttentionBackend("triton", triton_attention.write_kv, triton_attention.attend)
    raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")


class PrefillRow(NamedTuple):
    """A sequence with several new tokens this step (a prompt, or a chunk of one)."""

    start: int  # index of its first new token in the packed batch
    query_len: int
    context_slots: Tensor  # [seq_len] int64: slot of each token of the sequence, in order
    mask: Tensor | None  # [query_len, seq_len] bool, or None for plain causal (no cached prefix)


@dataclass
class AttentionMetadata:
    """Where one step's new tokens go in the paged KV cache, and what each of them attends to."""

    positions: Tensor  # [T] int64: position of each new token in its sequence
    slot_mapping: Tensor  # [T] int64: cache slot of each new token
    query_start_loc: Tensor  # [S + 1] int64: where each sequence's new tokens start in the batch
    seq_lens: Tensor  # [S] context length of each sequence after this step (int32 for triton)
    block_tables: Tensor  # [S, max_blocks], padded with block 0 (never read past seq_lens)
    max_query_len: int
    max_seq_len: int
    backend: AttentionBackend
    # torch backend only. Sequences with one new token are attended as one batch ...
    decode_tokens: Tensor | None = None  # [D] int64: their tokens' indices in the packed batch
    decode_slots: Tensor | None = None  # [D, L] int64: their contexts' slots, padded with the first
    decode_mask: Tensor | None = None  # [D, L] bool: True within each context
    # ... the others one by one.
    prefills: list[PrefillRow] | None = None

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed_tokens: list[int],
              query_lens: list[int], block_size: int, device: torch.device | str,
              backend: AttentionBackend | None = None) -> AttentionMetadata:
        """Metadata of a step in which sequence ``i`` has ``num_computed_tokens[i]`` tokens cached
        and computes ``query_lens[i]`` new ones; its block table must cover all of them."""
        backend = backend or get_backend("torch")
        _check_step(block_tables, num_computed_tokens, query_lens, block_size)
        tables = _pad(block_tables)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        seq_lens = torch.tensor(num_computed_tokens, dtype=torch.int64) + q_lens
        query_start_loc = F.pad(q_lens.cumsum(0), (1, 0))
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        offsets = torch.arange(len(seq_of_token)) - query_start_loc[seq_of_token]
        positions = (seq_lens - q_lens)[seq_of_token] + offsets
        common = {"positions": positions.to(device),
                  "slot_mapping": _slots(tables, seq_of_token, positions, block_size).to(device),
                  "query_start_loc": query_start_loc.to(device),
                  "max_query_len": max(query_lens, default=0),
                  "max_seq_len": int(seq_lens.max()) if len(seq_lens) else 0, "backend": backend}
        if backend.name != "torch":
            # The kernels take int32 tables and lengths.
            return cls(**common, seq_lens=seq_lens.to(device, torch.int32),
                       block_tables=tables.to(device, torch.int32))
        decode = (q_lens == 1).nonzero().flatten()
        decode_slots, decode_mask = _decode_context(tables, seq_lens, decode, block_size)
        starts = query_start_loc.tolist()
        prefills = [PrefillRow(starts[i], q,
                               _slots(tables, i, torch.arange(c + q), block_size).to(device),
                               _causal_mask(q, c + q, device))
                    for i, (c, q) in enumerate(zip(num_computed_tokens, query_lens)) if q > 1]
        return cls(**common, seq_lens=seq_lens.to(device), block_tables=tables.to(device),
                   decode_tokens=query_start_loc[decode].to(device),
                   decode_slots=decode_slots.to(device), decode_mask=decode_mask.to(device),
                   prefills=prefills)

    @property
    def last_token_indices(self) -> Tensor:
        """[S] index of each sequence's last new token in the batch: the one to sample from."""
        return self.query_start_loc[1:] - 1


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Write the new tokens' keys and values (``[T, num_kv_heads, head_dim]``) into their cache
    slots; a slot of -1 means "do not store"."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.flatten(0, 1).index_copy_(0, slots, key[keep])
    v_cache.flatten(0, 1).index_copy_(0, slots, value[keep])


def attend(query: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
           scale: float) -> Tensor:
    """Causal attention of each new token (``query``: ``[T, num_heads, head_dim]``) over its
    sequence's cached context and the new tokens up to itself. K/V of this step must already be
    written. Query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``."""
    k_slots, v_slots = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [num_slots, kvh, hd]
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if meta.decode_tokens.numel():
        # One new token per sequence: all of them in one op, each masked to its own context.
        # The query heads of one kv head form its "query rows", so K/V are never repeated.
        keys, values = k_slots[meta.decode_slots], v_slots[meta.decode_slots]  # [D, L, kvh, hd]
        q = query[meta.decode_tokens].view(-1, num_kv_heads, group, head_dim)
        attended = _sdpa(q, keys.transpose(1, 2), values.transpose(1, 2),
                         meta.decode_mask[:, None, None], scale)  # [D, kvh, group, hd]
        out[meta.decode_tokens] = attended.reshape(-1, num_heads, head_dim)
    for row in meta.prefills:
        rows = slice(row.start, row.start + row.query_len)
        keys, values = k_slots[row.context_slots], v_slots[row.context_slots]  # [C, kvh, hd]
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, C, hd]
        values = values.transpose(0, 1).repeat_interleave(group, dim=0)
        out[rows] = _sdpa(query[rows].transpose(0, 1), keys, values, row.mask,
                          scale).transpose(0, 1)
    return out


def _sdpa(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """torch's fused attention (float32 softmax for low-precision inputs); mask None means
    plain causal."""
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                          is_causal=mask is None, scale=scale)


def _causal_mask(query_len: int, seq_len: int, device: torch.device | str) -> Tensor | None:
    """None when there is no cached prefix; else the causal mask shifted right by the prefix."""
    if seq_len == query_len:
        return None
    positions = torch.arange(seq_len, device=device)
    return positions[None, :] <= positions[seq_len - query_len:, None]


def _slots(tables: Tensor, seqs: Tensor | int, positions: Tensor | int, block_size: int) -> Tensor:
    """Cache slot of token ``positions`` of sequence ``seqs`` (broadcast together)."""
    return tables[seqs, positions // block_size] * block_size + positions % block_size


def _decode_context(tables: Tensor, seq_lens: Tensor, decode: Tensor,
                    block_size: int) -> tuple[Tensor, Tensor]:
    """Slots and mask of the decode sequences' contexts, padded to the longest. Padding repeats a
    slot the sequence itself wrote: unwritten slots may hold NaN, and 0 * NaN would leak through."""
    context = torch.arange(int(seq_lens[decode].max()) if len(decode) else 0)
    mask = context < seq_lens[decode, None]
    seqs = decode[:, None]
    first_slots = _slots(tables, seqs, 0, block_size)
    return torch.where(mask, _slots(tables, seqs, context, block_size), first_slots), mask


def _pad(block_tables: list[list[int]]) -> Tensor:
    width = max((len(t) for t in block_tables), default=0)
    padded = [table + [0] * (width - len(table)) for table in block_tables]
    return torch.tensor(padded, dtype=torch.int64).view(-1, width)


def _check_step(block_tables: list[list[int]], num_computed_tokens: list[int],
                query_lens: list[int], block_size: int) -> None:
    if not len(block_tables) == len(num_computed_tokens) == len(query_lens):
        counts = f"{len(block_tables)}, {len(num_computed_tokens)} and {len(query_lens)}"
        raise ValueError("a step needs a block table, a computed count and a query length per "
                         f"sequence; got {counts}")
    for i, (table, computed, query_len) in enumerate(
            zip(block_tables, num_computed_tokens, query_lens)):
        if query_len < 1:
            raise ValueError(f"sequence {i} has query_len {query_len}; each needs at least 1")
        if len(table) * block_size < computed + query_len:
            raise ValueError(f"block table of sequence {i} has {len(table)} blocks of {block_size} "
                             f"slots, too few for its {computed + query_len} tokens")
