"""Block tables: which physical blocks hold each sequence's KV cache.

Mechanism only; the scheduler decides who runs. The block manager is the only door to the
blocks: its pools, tables and prefix cache are private, and callers ask it questions.
Paired check-and-act methods (``can_allocate``/``allocate``, ``can_append_slots``/
``append_slot``, ``can_swap_out``/``swap_out``, ``can_swap_in``/``swap_in``) make a lack of
memory a scheduling decision, never an exception in the middle of a step.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.scheduler_svc.block_pool import BlockPool
from pagedserve.scheduler_svc.block_snapshot import BlockSnapshot
from pagedserve.scheduler_svc.prefix_cache import PrefixCache
from pagedserve.scheduler_svc.sequence import Sequence

_NEW_BLOCK, _COPY = "new block", "copy"  # what the next token takes when it does not fit in place


@dataclass(frozen=True)
class AppendResult:
    """What ``append_slot`` did to the block table (at most one of the two)."""

    new_block: int | None = None         # appended at the end of the table
    cow: tuple[int, int] | None = None   # (src, dst): copy src into dst, now the last entry


class BlockManager:
    """Block tables over two pools, device blocks and CPU swap blocks, with a prefix cache.

    A table names device blocks, or CPU blocks while its sequence is swapped out. With
    ``enable_prefix_caching``, a new sequence reuses every leading full block whose tokens
    are cached, and ``allocate`` marks those tokens computed.
    """

    def __init__(self, block_size: int, num_device_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._device = BlockPool(num_device_blocks)
        self._cpu = BlockPool(num_cpu_blocks)
        self._watermark_blocks = int(watermark * num_device_blocks)
        self._prefix_cache = PrefixCache(block_size)
        self._tables: dict[int, list[int]] = {}
        self._swapped: set[int] = set()  # sequences whose tables name CPU blocks
        # Leading blocks of each table already offered to the prefix cache.
        self._num_offered: dict[int, int] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def max_seq_len(self) -> int:
        """The most tokens one sequence can hold: the device pool less the watermark."""
        return (self._device.num_blocks - self._watermark_blocks) * self.block_size

    @property
    def usage(self) -> float:
        """The fraction of device blocks in use (1 = full); O(1)."""
        return self._device.num_used / self._device.num_blocks if self._device.num_blocks else 0.0

    def table(self, seq_id: int) -> tuple[int, ...]:
        """The sequence's block table; empty while it holds no blocks."""
        return tuple(self._tables.get(seq_id, ()))

    def snapshot(self) -> BlockSnapshot:
        """A copy of the pools, tables and prefix cache for read-only views: O(blocks)."""
        return BlockSnapshot(self.block_size, self._device.snapshot(), self._cpu.snapshot(),
                             {seq_id: tuple(table) for seq_id, table in self._tables.items()},
                             frozenset(self._swapped), self._prefix_cache.copy())

    # ---------------------------------------------------------------- admission

    def can_allocate(self, seq: Sequence, num_forks: int = 0,
                     use_prefix_cache: bool = True) -> bool:
        """Room for a waiting sequence, and for the copy-on-write of its shared last block
        by each of ``num_forks`` samples to be forked from it; with ``use_prefix_cache``
        false, all its blocks are fresh."""
        hits = self._cached_prefix(seq) if use_prefix_cache else []
        # A hit on a free block needs no fresh block, but it does leave the free queue.
        num_revived = sum(1 for block_id in hits if self._device.refcounts[block_id] == 0)
        needed = self.blocks_needed(seq.num_tokens) - len(hits) + num_revived + num_forks
        # Admission keeps a watermark free so running sequences can still grow.
        return self._device.num_free - needed >= self._watermark_blocks

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> list[int]:
        """Give a waiting sequence blocks for all its tokens, reusing its cached prefix
        unless ``use_prefix_cache`` is false (as ``can_allocate`` was asked).

        Sets ``seq.num_computed_tokens`` to the tokens covered by cache hits; returns the
        block table.
        """
        assert seq.seq_id not in self._tables, f"seq {seq.seq_id} already has blocks"
        hits = self._cached_prefix(seq) if use_prefix_cache else []
        # Take the hits first, so that a fresh allocation cannot evict one of them.
        for block_id in hits:
            self._device.incref(block_id)
        num_fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        table = hits + [self._allocate(self._device) for _ in range(num_fresh)]
        self._tables[seq.seq_id] = table
        self._num_offered[seq.seq_id] = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        return list(table)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's full blocks within ``num_computed_tokens`` to the prefix cache.

        Call it once the executor has acknowledged the step that computed them: a block is
        never served from the cache before its KV is written.
        """
        if not self.enable_prefix_caching:
            return
        assert seq.seq_id not in self._swapped, f"seq {seq.seq_id} is swapped out"
        start = self._num_offered.get(seq.seq_id, 0)
        end = seq.num_computed_tokens // self.block_size
        if end > start:
            self._prefix_cache.insert(self._tables[seq.seq_id], seq.token_ids, start, end)
            self._num_offered[seq.seq_id] = end

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, so that the next prompts compute from scratch (as a
        benchmark's repeated runs must); False, changing nothing, while any block is in use."""
        if self._tables:
            return False
        for block_id in list(self._prefix_cache.blocks):
            self._prefix_cache.evict(block_id)
        return True

    # ---------------------------------------------------------------- decode

    def can_append_slots(self, seqs: list[Sequence], ahead: int = 0) -> bool:
        """Room for ``append_slot(seq, ahead)`` of every one of ``seqs``, all or nothing."""
        return self.num_append_blocks(seqs, ahead) <= self._device.num_free

    def needs_block(self, seq: Sequence) -> bool:
        """Whether ``append_slot`` would take a block: the last one is full, or shared."""
        return self._next_slot(self._device_table(seq), seq.num_tokens) is not None

    def num_append_blocks(self, seqs: list[Sequence], ahead: int = 0) -> int:
        """Fresh blocks that ``append_slot(seq, ahead)`` takes for each of ``seqs``: one per
        full last block, one per copy-on-write of a shared last block."""
        needed = 0
        writers: dict[int, int] = {}  # shared last block -> how many of seqs write to it
        for seq in seqs:
            table = self._device_table(seq)
            takes = self._next_slot(table, seq.num_tokens + ahead)
            if takes is _NEW_BLOCK:
                needed += 1
            elif takes is _COPY:
                writers[table[-1]] = writers.get(table[-1], 0) + 1
        # Each writer copies the shared block, except the last one when nobody else holds it.
        refcounts = self._device.refcounts
        return needed + sum(k - (refcounts[b] == k) for b, k in writers.items())

    def append_slot(self, seq: Sequence, ahead: int = 0) -> AppendResult:
        """Make room for the sequence's last token: a new block when the last one is full,
        a copy of the last one when it is shared (copy-on-write). ``ahead``: for that many
        tokens more, not yet sampled (async scheduling; at most a block's worth)."""
        table = self._device_table(seq)
        takes = self._next_slot(table, seq.num_tokens + ahead)
        if takes is None:
            return AppendResult()
        if takes is _NEW_BLOCK:
            table.append(self._allocate(self._device))
            return AppendResult(new_block=table[-1])
        # Shared by a fork: write into a private copy. A full block is never written again,
        # so only a partial last block (never a cached one) gets here.
        last = table[-1]
        table[-1] = self._allocate(self._device)
        self._device.free(last)
        return AppendResult(cow=(last, table[-1]))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` the parent's blocks: each is shared (refcount + 1) until written."""
        assert child.seq_id not in self._tables, f"seq {child.seq_id} already has blocks"
        table = self._device_table(parent)
        for block_id in table:
            self._device.incref(block_id)
        self._tables[child.seq_id] = list(table)
        self._num_offered[child.seq_id] = self._num_offered.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's reference to each of its blocks, wherever its table lives;
        nothing for a sequence that holds none (waiting, or preempted for recompute)."""
        table = self._tables.pop(seq.seq_id, None)
        if table is None:
            return
        pool = self._cpu if seq.seq_id in self._swapped else self._device
        self._swapped.discard(seq.seq_id)
        self._num_offered.pop(seq.seq_id, None)
        self._release(table, pool)

    # ---------------------------------------------------------------- swap

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self._num_distinct_blocks(seqs) <= self._cpu.num_free

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move a sequence group to CPU swap space, all or nothing; returns the
        (device, cpu) block pairs to copy. Blocks shared within the group move once."""
        assert not any(seq.seq_id in self._swapped for seq in seqs), "group already swapped out"
        assert self.can_swap_out(seqs), "not enough free CPU blocks: check can_swap_out"
        pairs = self._move(seqs, self._device, self._cpu)
        for seq in seqs:
            self._swapped.add(seq.seq_id)
            # The device copies stay cached until evicted; after swap-in the sequence's
            # blocks are offered to the cache again.
            self._num_offered.pop(seq.seq_id, None)
        return pairs

    def can_swap_in(self, seqs: list[Sequence]) -> bool:
        """Room to bring a swapped-out group back, and then for the slot of each sequence's
        next token (``append_slot`` takes one block each at most). No watermark: these
        sequences were admitted already."""
        return self._num_distinct_blocks(seqs) + len(seqs) <= self._device.num_free

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move a swapped-out sequence group back to fresh device blocks, all or nothing;
        returns the (cpu, device) block pairs to copy."""
        assert all(seq.seq_id in self._swapped for seq in seqs), "group not swapped out"
        assert self.can_swap_in(seqs), "not enough free device blocks: check can_swap_in"
        pairs = self._move(seqs, self._cpu, self._device)
        self._swapped.difference_update(seq.seq_id for seq in seqs)
        return pairs

    # ---------------------------------------------------------------- internals

    def _next_slot(self, table: list[int], num_tokens: int) -> str | None:
        """The one rule for a new block: what a table must take to hold ``num_tokens``."""
        # Tables only grow at the end; copy-on-write changes the last entry only.
        if len(table) * self.block_size < num_tokens:
            return _NEW_BLOCK
        return _COPY if self._device.refcounts[table[-1]] > 1 else None

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        # The last prompt token is always computed: its logits sample the first output.
        return self._prefix_cache.match(seq.token_ids, (seq.num_tokens - 1) // self.block_size)

    def _device_table(self, seq: Sequence) -> list[int]:
        assert seq.seq_id not in self._swapped, f"seq {seq.seq_id} is swapped out"
        return self._tables[seq.seq_id]

    def _allocate(self, pool: BlockPool) -> int:
        block_id = pool.allocate()
        if pool is self._device:
            self._prefix_cache.evict(block_id)  # reused: it no longer holds its old prefix
        return block_id

    def _move(self, seqs: list[Sequence], src: BlockPool, dst: BlockPool) -> list[tuple[int, int]]:
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = self._tables[seq.seq_id]
            for block_id in table:
                if block_id in mapping:
                    dst.incref(mapping[block_id])  # shared within the group: stays shared
                else:
                    mapping[block_id] = self._allocate(dst)
            self._tables[seq.seq_id] = [mapping[block_id] for block_id in table]
            self._release(table, src)
        return list(mapping.items())

    def _num_distinct_blocks(self, seqs: list[Sequence]) -> int:
        return len({block_id for seq in seqs for block_id in self._tables[seq.seq_id]})

    @staticmethod
    def _release(table: list[int], pool: BlockPool) -> None:
        # Free in reverse: a sequence's tail blocks reach the free queue first, so they are
        # evicted before its head blocks, which other prompts are likelier to share.
        for block_id in reversed(table):
            pool.free(block_id)
