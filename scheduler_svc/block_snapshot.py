"""Read-only views of the block manager: copies of its pools, tables and prefix cache taken
at one moment, for the admin socket and the tests. Nothing read from them changes a block.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from pagedserve.scheduler_svc.prefix_cache import PrefixCache
from pagedserve.scheduler_svc.sequence import Sequence


@dataclass(frozen=True)
class PoolSnapshot:
    """One pool: each block's refcount by block id, and the free blocks in the order
    ``allocate`` takes them (least recently freed first)."""

    refcounts: tuple[int, ...]
    free_queue: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.refcounts)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def stats(self) -> dict:
        """Block counts: ``shared`` blocks have refcount > 1; ``refcounts`` maps each refcount
        of a used block to how many blocks have it."""
        histogram = Counter(self.refcounts)
        histogram.pop(0, None)
        return {"total": self.num_blocks, "free": self.num_free, "used": self.num_used,
                "shared": sum(n for refcount, n in histogram.items() if refcount > 1),
                "refcounts": {str(refcount): n for refcount, n in sorted(histogram.items())}}

    def block_states(self) -> str:
        """One character per block, by block id: free ``.``, used ``u``, shared ``s``."""
        return "".join(["." if r == 0 else "u" if r == 1 else "s" for r in self.refcounts])


@dataclass(frozen=True)
class BlockSnapshot:
    """The block manager at one moment. ``tables[seq_id]`` names device blocks, or CPU blocks
    for the ids in ``swapped``; ``prefix_cache`` is a copy of the device blocks' index."""

    block_size: int
    device: PoolSnapshot
    cpu: PoolSnapshot
    tables: dict[int, tuple[int, ...]]
    swapped: frozenset[int]
    prefix_cache: PrefixCache

    @classmethod
    def empty(cls, block_size: int) -> BlockSnapshot:
        """No blocks at all: the view before an executor is ready, or after it is lost."""
        no_pool = PoolSnapshot((), ())
        return cls(block_size, no_pool, no_pool, {}, frozenset(), PrefixCache(block_size))

    def stats(self) -> dict:
        """Block counts per pool: total, free, used, ``cached`` (free device blocks still
        holding a reusable prefix; always 0 on CPU), ``shared`` (refcount > 1) and the
        refcount histogram of used blocks."""
        refcounts = self.device.refcounts
        cached = sum(1 for block_id in self.prefix_cache.blocks if refcounts[block_id] == 0)
        return {"device": {**self.device.stats(), "cached": cached},
                "cpu": {**self.cpu.stats(), "cached": 0}}

    def slots(self, seqs: Iterable[Sequence]) -> dict:
        """Token slots of the used device blocks: ``allocated`` (blocks x block size) and
        ``used`` (holding a token of one of ``seqs``, the sequences on the device).

        Every block but the last of a table is full, so only last blocks leave slots empty:
        O(len(seqs))."""
        size = self.block_size
        last_fill: dict[int, int] = {}  # a last block shared by forks counts once
        for seq in seqs:
            table = self.tables.get(seq.seq_id)
            if table and seq.seq_id not in self.swapped:
                fill = min(size, seq.num_tokens - (len(table) - 1) * size)
                last_fill[table[-1]] = max(fill, last_fill.get(table[-1], 0))
        allocated = self.device.num_used * size
        empty = sum(size - fill for fill in last_fill.values())
        return {"used": allocated - empty, "allocated": allocated}

    def block_states(self) -> dict:
        """The pools' maps, one character per block by block id. Device: free ``.``,
        cached ``c`` (free, holding a prefix), used ``u``, shared ``s``; CPU: free ``.``,
        swapped ``w`` (holding a swapped-out sequence's KV)."""
        device = list(self.device.block_states())
        for block_id in self.prefix_cache.blocks:
            if device[block_id] == ".":
                device[block_id] = "c"
        cpu = self.cpu.block_states().replace("u", "w").replace("s", "w")
        return {"device": "".join(device), "cpu": cpu}

    def blocks_of(self, seq: Sequence) -> dict:
        """A sequence's block table: its ``pool`` ("device", "cpu" while swapped out, None
        while it holds no blocks) and each block's refcount and fill (tokens it holds)."""
        table = self.tables.get(seq.seq_id, ())
        on_cpu = seq.seq_id in self.swapped
        refcounts = (self.cpu if on_cpu else self.device).refcounts
        size = self.block_size
        return {"pool": ("cpu" if on_cpu else "device") if table else None,
                "blocks": [{"block_id": block_id, "refcount": refcounts[block_id],
                            "fill": max(0, min(size, seq.num_tokens - i * size))}
                           for i, block_id in enumerate(table)]}
