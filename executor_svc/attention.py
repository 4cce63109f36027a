"""Attention over the paged KV cache: the per-step metadata, the backends, and the ``torch``
backend itself.

A step packs the new tokens of all its sequences one after another. Each sequence's context lives
in the KV cache (``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer) at the blocks its
block table names; attention reads K/V only through that table. The metadata turns tables into
cache slots (``block_id * block_size + offset``) once per step, and every layer reuses them.
Two backends share that interface: ``torch`` (the path on CPU: the whole step in a compiled
kernel, ``cpu_kernels``, where it serves; else decode rows in batched matmuls and prompts in
torch's fused attention) and ``triton`` (the paged kernels of ``kernels``; the path on CUDA).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.executor_svc import cpu_kernels


class AttentionBackend(NamedTuple):
    """How the model writes new K/V into the cache and attends over it."""

    name: str
    write_kv: Callable[..., None]  # (key, value, k_cache, v_cache, slot_mapping)
    # (query, key, value, k_cache, v_cache, meta, scale) -> [T, heads, dim]
    attend: Callable[..., Tensor]


BACKENDS = ("torch", "triton")
# torch's fused attention takes grouped K/V heads from 2.5 on; before, they are repeated.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; ``triton`` imports triton and the kernels only when asked."""
    if name == "torch":
        return AttentionBackend("torch", write_kv, attend)
    if name == "triton":
        from pagedserve.executor_svc import triton_attention
        return AttentionBackend("triton", triton_attention.write_kv, triton_attention.attend)
    raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")


class PrefillRow(NamedTuple):
    """A sequence with several new tokens this step (a prompt, or a chunk of one)."""

    start: int  # index of its first new token in the packed batch
    query_len: int
    context_len: int  # tokens it attends over: cached prefix + new tokens
    context_blocks: Tensor | None  # [ceil(context_len / block_size)] int64, or None when
    #                                nothing is cached: then the step's own K/V are the context
    mask: Tensor | None  # [query_len, context_len] bool, or None for plain causal


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
    # torch backend only. Sequences with one new token are attended as one batch, reading
    # their contexts block by block ...
    decode_tokens: Tensor | None = None  # [D] int64: their tokens' indices in the packed batch
    decode_tables: Tensor | None = None  # [D, B] int64: their blocks, padded with the null block
    decode_lens: Tensor | None = None  # [D] int64: their context lengths
    decode_mask: Tensor | None = None  # [D, B * block_size] bool: True within each context
    decode_last: Tensor | None = None  # [D] int64: index in the table of each last block
    decode_tail: Tensor | None = None  # [D, block_size] bool: last-block slots past the context
    # ... the others one by one.
    prefills: list[PrefillRow] | None = None

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed_tokens: list[int],
              query_lens: list[int], block_size: int, device: torch.device | str,
              backend: AttentionBackend | None = None,
              null_block: int | None = None) -> AttentionMetadata:
        """Metadata of a step in which sequence ``i`` has ``num_computed_tokens[i]`` tokens cached
        and computes ``query_lens[i]`` new ones; its block table must cover all of them.

        The torch backend reads whole blocks and pads the decode rows' tables with
        ``null_block``, a block of zeros that no sequence owns (``CacheEngine.null_block``):
        it needs one whenever decode rows have tables of different lengths."""
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
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        decode_meta = _decode_context([block_tables[i] for i in decode],
                                      seq_lens[decode], block_size, null_block)
        starts = query_start_loc.tolist()
        prefills = [PrefillRow(starts[i], q, c + q,
                               torch.tensor(block_tables[i][:-(-(c + q) // block_size)],
                                            device=device) if c else None,
                               _causal_mask(q, c + q, device))
                    for i, (c, q) in enumerate(zip(num_computed_tokens, query_lens)) if q > 1]
        return cls(**common, seq_lens=seq_lens.to(device), block_tables=tables.to(device),
                   decode_tokens=query_start_loc[decode].to(device),
                   **{name: t.to(device) for name, t in decode_meta.items()},
                   prefills=prefills)

    @functools.cached_property
    def kernel_batch(self) -> cpu_kernels.AttentionBatch:
        """The step's sequences as the CPU attention kernel reads them, for every layer."""
        return cpu_kernels.attention_batch(self.block_tables, self.query_start_loc,
                                           self.seq_lens)

    @property
    def last_token_indices(self) -> Tensor:
        """[S] index of each sequence's last new token in the batch: the one to sample from."""
        return self.query_start_loc[1:] - 1


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Write the new tokens' keys and values (``[T, num_kv_heads, head_dim]``) into their cache
    slots; a slot of -1 means "do not store". A cache of another dtype stores them cast."""
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def attend(query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
           meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal attention of each new token (``query``: ``[T, num_heads, head_dim]``) over its
    sequence's cached context and the new tokens up to itself. K/V of this step (``key``,
    ``value``: ``[T, num_kv_heads, head_dim]``) must already be written to the cache. Query
    head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``. On the CPU with float32
    queries (over a float32 or bfloat16 cache) the whole step is one call of the compiled
    kernel."""
    if cpu_kernels.serves(query, k_cache):
        return cpu_kernels.paged_attention(query, k_cache, v_cache, meta.kernel_batch, scale)
    if not meta.prefills and meta.decode_tokens.numel() == query.shape[0]:
        return _decode(query, k_cache, v_cache, meta, scale)  # every row decodes, in order
    out = torch.empty_like(query)
    if meta.decode_tokens.numel():
        out[meta.decode_tokens] = _decode(query[meta.decode_tokens], k_cache, v_cache, meta,
                                          scale)
    group = query.shape[1] // k_cache.shape[2]
    for row in meta.prefills:
        rows = slice(row.start, row.start + row.query_len)
        if row.context_blocks is None:  # nothing cached: the step's own K/V are the context,
            # as the cache holds them (rounded, in a lower-precision cache)
            keys, values = key[rows].to(k_cache.dtype), value[rows].to(v_cache.dtype)
        else:
            keys = k_cache.index_select(0, row.context_blocks).flatten(0, 1)[:row.context_len]
            values = v_cache.index_select(0, row.context_blocks).flatten(0, 1)[:row.context_len]
        out[rows] = _prefill(query[rows], keys.to(query.dtype), values.to(query.dtype),
                             row.mask, scale, group)
    return out


def _prefill(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float,
             group: int) -> Tensor:
    """One sequence's new tokens (``query``: ``[Q, H, hd]``) over its context (``keys``,
    ``values``: ``[C, kvh, hd]``) in torch's fused attention. Its inputs are 4-D: on CPU,
    3-D inputs take the unfused math path, 2.6x slower on 128-token prompts here."""
    keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, kvh, C, hd]
    grouped = {}
    if group > 1 and _SDPA_GQA:
        grouped = {"enable_gqa": True}
    elif group > 1:
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys, values,
                                         attn_mask=mask, is_causal=mask is None, scale=scale,
                                         **grouped)
    return out[0].transpose(0, 1)


def _decode(query: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                     scale: float) -> Tensor:
    """All sequences in two batched matmuls. Each sequence's blocks are gathered whole into a
    contiguous ``[L, kvh * hd]`` context. Query heads are spread block-diagonally over the kv
    heads' columns, so one matmul scores every head against its own kv head (the other
    columns multiply zeros), and the kv head's columns of the output are kept."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    width = num_kv_heads * head_dim
    blocks = meta.decode_tables.flatten()
    # Low-precision caches are attended in float32, as torch's fused attention does.
    keys = k_cache.index_select(0, blocks).view(num_seqs, -1, width).float()  # [D, L, kvh*hd]
    values = v_cache.index_select(0, blocks).view(num_seqs, -1, k_cache.shape[1], width).float()
    # Slots past a context in its last block were never written by this sequence: they may
    # hold anything, and 0 * NaN would leak through the second matmul. Keys need no care:
    # their scores are masked out.
    rows = torch.arange(num_seqs, device=query.device)
    values[rows, meta.decode_last] = values[rows, meta.decode_last].masked_fill(
        meta.decode_tail[..., None], 0)
    values = values.view(num_seqs, -1, width)
    spread = torch.eye(num_kv_heads, device=query.device)
    spread_query = (query.float().view(num_seqs, num_kv_heads, group, 1, head_dim)
                    * spread.view(1, num_kv_heads, 1, num_kv_heads, 1)).view(
                        num_seqs, num_heads, width)
    scores = torch.bmm(spread_query, keys.transpose(1, 2)).mul_(scale)  # [D, H, L]
    scores.masked_fill_(~meta.decode_mask[:, None], float("-inf"))
    out = torch.bmm(scores.softmax(-1), values).view(num_seqs, num_kv_heads, group,
                                                     num_kv_heads, head_dim)
    return torch.diagonal(out, dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(
        num_seqs, num_heads, head_dim).to(query.dtype)


def _causal_mask(query_len: int, seq_len: int, device: torch.device | str) -> Tensor | None:
    """None when there is no cached prefix; else the causal mask shifted right by the prefix."""
    if seq_len == query_len:
        return None
    positions = torch.arange(seq_len, device=device)
    return positions[None, :] <= positions[seq_len - query_len:, None]


def _slots(tables: Tensor, seqs: Tensor | int, positions: Tensor | int, block_size: int) -> Tensor:
    """Cache slot of token ``positions`` of sequence ``seqs`` (broadcast together)."""
    return tables[seqs, positions // block_size] * block_size + positions % block_size


def _decode_context(tables: list[list[int]], seq_lens: Tensor, block_size: int,
                    null_block: int | None) -> dict[str, Tensor]:
    """Block tables of the decode rows cut to their contexts and padded to the longest with
    the null block; the mask of real positions; where each last block is and which of its
    slots lie past the context."""
    num_blocks = (seq_lens + block_size - 1) // block_size
    width = int(num_blocks.max()) if len(tables) else 0
    if null_block is None and bool((num_blocks < width).any()):
        raise ValueError("decode rows with tables of different lengths need a null_block")
    padded = [table[:n] + [null_block] * (width - n)
              for table, n in zip(tables, num_blocks.tolist())]
    context = torch.arange(width * block_size)
    last = num_blocks - 1
    return {"decode_tables": torch.tensor(padded, dtype=torch.int64).view(len(tables), width),
            "decode_lens": seq_lens,
            "decode_mask": context < seq_lens[:, None],
            "decode_last": last,
            "decode_tail": torch.arange(block_size) >= (seq_lens - last * block_size)[:, None]}


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
