"""Prefix cache: which device blocks hold the KV of which token prefix.

A full block is named by a chained hash, ``hash_block(parent hash, its tokens)``, so one
hash stands for the whole prefix up to the block's end. Every hit is verified against the
block's stored tokens and parent block, so a hash collision never serves another prefix's
KV. The cache only indexes blocks: the block pool decides when a free cached block is
reused, and the block manager then calls ``evict``.
"""
from __future__ import annotations

from dataclasses import dataclass


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Content hash of a full block, chained to the hash of the block before it."""
    return hash((parent_hash, token_ids))


@dataclass(frozen=True, slots=True)
class CachedBlock:
    hash: int
    token_ids: tuple[int, ...]
    parent: int | None  # the block holding the previous block of the prefix; None for the first


class PrefixCache:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: dict[int, CachedBlock] = {}  # block id -> the prefix block it holds
        self.block_of: dict[int, int] = {}        # hash -> block id

    def match(self, token_ids: list[int], max_blocks: int) -> list[int]:
        """The cached blocks holding the longest prefix of ``token_ids``, at most ``max_blocks``."""
        hits: list[int] = []
        parent_hash = None
        for i in range(max_blocks):
            tokens = self._block_tokens(token_ids, i)
            parent_hash = hash_block(parent_hash, tokens)
            block_id = self.block_of.get(parent_hash)
            if block_id is None:
                break
            cached = self.blocks[block_id]
            # Verify: the same tokens after the same parent block, or it is a collision.
            if cached.token_ids != tokens or cached.parent != (hits[-1] if hits else None):
                break
            hits.append(block_id)
        return hits

    def insert(self, table: list[int], token_ids: list[int], start: int, end: int) -> None:
        """Index the full, computed blocks ``table[start:end]`` of a sequence's block table."""
        for i in range(start, end):
            parent = table[i - 1] if i else None
            # Only chains from the first block are findable: a block whose parent is not
            # indexed (a duplicate of a prefix cached in another block) is not indexed either.
            # A cached parent outlives its children: freed in reverse, children evict first.
            if parent is not None and parent not in self.blocks:
                return
            tokens = self._block_tokens(token_ids, i)
            block_hash = hash_block(self.blocks[parent].hash if i else None, tokens)
            if block_hash in self.block_of:
                return  # the same prefix (or a colliding one) is cached in another block
            self.blocks[table[i]] = CachedBlock(block_hash, tokens, parent)
            self.block_of[block_hash] = table[i]

    def evict(self, block_id: int) -> None:
        """Forget what a block held: it is being reused for other tokens."""
        cached = self.blocks.pop(block_id, None)
        if cached is not None:
            del self.block_of[cached.hash]

    def copy(self) -> PrefixCache:
        """An independent copy of the index, for read-only views."""
        other = PrefixCache(self.block_size)
        other.blocks, other.block_of = dict(self.blocks), dict(self.block_of)
        return other

    def _block_tokens(self, token_ids: list[int], i: int) -> tuple[int, ...]:
        return tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
