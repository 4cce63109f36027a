"""The ``torch`` attention backend: torch operators only, on any device. On a CPU it serves
what the compiled kernels (``backends.cpu``) do not: other dtypes, or no C compiler.

Sequences with one new token (decode rows) are attended as one batch, reading their contexts
block by block; the others (prompts, or chunks of them) one by one in torch's fused attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.executor_svc.attention import (AttentionBackend, AttentionMetadata, StepLayout,
                                               rope_then_write)
from pagedserve.executor_svc.rope import StepRope

# torch's fused attention takes grouped K/V heads from 2.5 on; before, they are repeated.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class PrefillRow(NamedTuple):
    """A sequence with several new tokens this step (a prompt, or a chunk of one)."""

    start: int  # index of its first new token in the packed batch
    query_len: int
    context_len: int  # tokens it attends over: cached prefix + new tokens
    context_blocks: Tensor | None  # [ceil(context_len / block_size)] int64, or None when
    #                                nothing is cached: then the step's own K/V are the context
    mask: Tensor | None  # [query_len, context_len] bool, or None for plain causal


@dataclass
class TorchMetadata(AttentionMetadata):
    """The decode rows, attended as one batch, and the prefill rows, one by one."""

    decode_tokens: Tensor  # [D] int64: the decode rows' tokens' indices in the packed batch
    decode_tables: Tensor  # [D, B] int64: their blocks, padded with the null block
    decode_mask: Tensor  # [D, B * block_size] bool: True within each context
    decode_last: Tensor  # [D] int64: index in the table of each last block
    decode_tail: Tensor  # [D, block_size] bool: last-block slots past the context
    prefills: list[PrefillRow]


class TorchBackend(AttentionBackend):
    """Decode rows read whole blocks, their tables padded with ``null_block``: a block of zeros
    that no sequence owns (``CacheEngine.null_block``), needed whenever decode rows have
    tables of different lengths."""

    name = "torch"

    def __init__(self, block_size: int, device: torch.device | str,
                 null_block: int | None = None):
        super().__init__(block_size, device)
        self.null_block = null_block

    def build(self, block_tables: list[list[int]], num_computed_tokens: list[int],
              query_lens: list[int]) -> TorchMetadata:
        layout = StepLayout.build(block_tables, num_computed_tokens, query_lens, self.block_size)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        decode_meta = _decode_context([block_tables[i] for i in decode], layout.seq_lens[decode],
                                      self.block_size, self.null_block)
        starts = layout.query_start_loc.tolist()
        prefills = [PrefillRow(starts[i], q, c + q, self._context_blocks(block_tables[i], c + q)
                               if c else None, _causal_mask(q, c + q, self.device))
                    for i, (c, q) in enumerate(zip(num_computed_tokens, query_lens)) if q > 1]
        return TorchMetadata(self, **self._common(layout),
                             decode_tokens=layout.query_start_loc[decode].to(self.device),
                             **{name: t.to(self.device) for name, t in decode_meta.items()},
                             prefills=prefills)

    def rope_write_kv(self, qkv: Tensor, num_heads: int, rope: StepRope,
                      kv_cache: tuple[Tensor, Tensor],
                      meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor]:
        return rope_then_write(qkv, num_heads, rope, kv_cache, meta.slot_mapping, write_kv)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor,
               v_cache: Tensor, meta: TorchMetadata, scale: float) -> Tensor:
        if not meta.prefills and meta.decode_tokens.numel() == query.shape[0]:
            return decode(query, k_cache, v_cache, meta, scale)  # every row decodes, in order
        out = torch.empty_like(query)
        if meta.decode_tokens.numel():
            out[meta.decode_tokens] = decode(query[meta.decode_tokens], k_cache, v_cache, meta,
                                             scale)
        group = query.shape[1] // k_cache.shape[2]
        for row in meta.prefills:
            rows = slice(row.start, row.start + row.query_len)
            if row.context_blocks is None:  # nothing cached: the step's own K/V are the
                # context, as the cache holds them (rounded, in a lower-precision cache)
                keys, values = key[rows].to(k_cache.dtype), value[rows].to(v_cache.dtype)
            else:
                keys = k_cache.index_select(0, row.context_blocks).flatten(0, 1)
                values = v_cache.index_select(0, row.context_blocks).flatten(0, 1)
                keys, values = keys[:row.context_len], values[:row.context_len]
            out[rows] = prefill(query[rows], keys.to(query.dtype), values.to(query.dtype),
                                row.mask, scale, group)
        return out

    def _context_blocks(self, table: list[int], context_len: int) -> Tensor:
        return torch.tensor(table[:-(-context_len // self.block_size)], device=self.device)


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Write the new tokens' keys and values (``[T, num_kv_heads, head_dim]``) into their cache
    slots; a slot of -1 means "do not store". A cache of another dtype stores them cast."""
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def prefill(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float,
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


def decode(query: Tensor, k_cache: Tensor, v_cache: Tensor, meta: TorchMetadata,
           scale: float) -> Tensor:
    """All decode rows in two batched matmuls. Each sequence's blocks are gathered whole into
    a contiguous ``[L, kvh * hd]`` context. Query heads are spread block-diagonally over the kv
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


def _causal_mask(query_len: int, seq_len: int, device: torch.device) -> Tensor | None:
    """None when there is no cached prefix; else the causal mask shifted right by the prefix."""
    if seq_len == query_len:
        return None
    positions = torch.arange(seq_len, device=device)
    return positions[None, :] <= positions[seq_len - query_len:, None]


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
            "decode_mask": context < seq_lens[:, None],
            "decode_last": last,
            "decode_tail": torch.arange(block_size) >= (seq_lens - last * block_size)[:, None]}
