"""Block tables: which physical blocks hold each sequence's KV cache.

Mechanism only; the scheduler decides who runs. Paired check-and-act methods
(``can_allocate``/``allocate``, ``can_append_slots``/``append_slot``,
``can_swap_out``/``swap_out``, ``can_swap_in``/``swap_in``) make a lack of memory a
scheduling decision, never an exception in the middle of a step.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.scheduler_svc.block_pool import BlockPool
from pagedserve.scheduler_svc.prefix_cache import PrefixCache
from pagedserve.scheduler_svc.sequence import Sequence


@dataclass(frozen=True)
class AppendResult:
    """What ``append_slot`` did to the block table (at most one of the two)."""

    new_block: int | None = None         # appended at the end of the table
    cow: tuple[int, int] | None = None   # (src, dst): copy src into dst, now the last entry


class BlockManager:
    """Block tables over two pools, device blocks and CPU swap blocks, with a prefix cache.

    ``tables[seq_id]`` names device blocks, or CPU blocks for the ids in ``swapped``.
    With ``enable_prefix_caching``, a new sequence reuses every leading full block whose
    tokens are cached, and ``allocate`` marks those tokens computed.
    """

    def __init__(self, block_size: int, num_device_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.device = BlockPool(num_device_blocks)
        self.cpu = BlockPool(num_cpu_blocks)
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache = PrefixCache(block_size)
        self.tables: dict[int, list[int]] = {}
        self.swapped: set[int] = set()  # sequences whose tables name CPU blocks
        self.prefix_queries = 0         # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0            # of those, tokens found cached
        # Leading blocks of each table already offered to the prefix cache.
        self._num_offered: dict[int, int] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- admission

    def can_allocate(self, seq: Sequence, num_forks: int = 0) -> bool:
        """Room for a waiting sequence, and for the copy-on-write of its shared last block
        by each of ``num_forks`` samples to be forked from it."""
        hits = self._cached_prefix(seq)
        # A hit on a free block needs no fresh block, but it does leave the free queue.
        num_revived = sum(1 for block_id in hits if self.device.refcounts[block_id] == 0)
        needed = self.blocks_needed(seq.num_tokens) - len(hits) + num_revived + num_forks
        # Admission keeps a watermark free so running sequences can still grow.
        return self.device.num_free - needed >= self.watermark_blocks

    def allocate(self, seq: Sequence) -> list[int]:
        """Give a waiting sequence blocks for all its tokens, reusing its cached prefix.

        Sets ``seq.num_computed_tokens`` to the tokens covered by cache hits; returns the
        block table.
        """
        assert seq.seq_id not in self.tables, f"seq {seq.seq_id} already has blocks"
        hits = self._cached_prefix(seq)
        # Take the hits first, so that a fresh allocation cannot evict one of them.
        for block_id in hits:
            self.device.incref(block_id)
        num_fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        table = hits + [self._allocate(self.device) for _ in range(num_fresh)]
        self.tables[seq.seq_id] = table
        self._num_offered[seq.seq_id] = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
        return table

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's full blocks within ``num_computed_tokens`` to the prefix cache.

        Call it once the executor has acknowledged the step that computed them: a block is
        never served from the cache before its KV is written.
        """
        if not self.enable_prefix_caching:
            return
        assert seq.seq_id not in self.swapped, f"seq {seq.seq_id} is swapped out"
        start = self._num_offered.get(seq.seq_id, 0)
        end = seq.num_computed_tokens // self.block_size
        if end > start:
            self.prefix_cache.insert(self.tables[seq.seq_id], seq.token_ids, start, end)
            self._num_offered[seq.seq_id] = end

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, so that the next prompts compute from scratch (as a
        benchmark's repeated runs must); False, changing nothing, while any block is in use."""
        if self.tables:
            return False
        for block_id in list(self.prefix_cache.blocks):
            self.prefix_cache.evict(block_id)
        return True

    # ---------------------------------------------------------------- decode

    def can_append_slots(self, seqs: list[Sequence]) -> bool:
        """Room for ``append_slot`` of every sequence of a group, all or nothing."""
        return self.num_append_blocks(seqs) <= self.device.num_free

    def needs_block(self, seq: Sequence) -> bool:
        """Whether ``append_slot`` would take a block: the last one is full, or shared."""
        table = self._device_table(seq)
        return (len(table) * self.block_size < seq.num_tokens
                or self.device.refcounts[table[-1]] > 1)

    def num_append_blocks(self, seqs: list[Sequence], ahead: int = 0) -> int:
        """Fresh blocks that ``append_slot(seq, ahead)`` takes for each of ``seqs``: one per
        full last block, one per copy-on-write of a shared last block."""
        needed = 0
        holders: dict[int, int] = {}  # shared last block -> how many of seqs write to it
        refcounts, block_size = self.device.refcounts, self.block_size
        for seq in seqs:
            table = self._device_table(seq)
            if len(table) * block_size < seq.num_tokens + ahead:
                needed += 1
            elif refcounts[table[-1]] > 1:
                holders[table[-1]] = holders.get(table[-1], 0) + 1
        # Each writer copies the shared block, except the last one when nobody else holds it.
        return needed + sum(k - (refcounts[b] == k) for b, k in holders.items())

    def append_slot(self, seq: Sequence, ahead: int = 0) -> AppendResult:
        """Make room for the sequence's last token: a new block when the last one is full,
        a copy of the last one when it is shared (copy-on-write). ``ahead``: for that many
        tokens more, not yet sampled (async scheduling; at most a block's worth)."""
        table = self._device_table(seq)
        if len(table) * self.block_size < seq.num_tokens + ahead:
            # Tables only grow at the end; copy-on-write changes the last entry only.
            table.append(self._allocate(self.device))
            return AppendResult(new_block=table[-1])
        last = table[-1]
        if self.device.refcounts[last] == 1:
            return AppendResult()
        # Shared by a fork: write into a private copy. A full block is never written again,
        # so only a partial last block (never a cached one) gets here.
        table[-1] = self._allocate(self.device)
        self.device.free(last)
        return AppendResult(cow=(last, table[-1]))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` the parent's blocks: each is shared (refcount + 1) until written."""
        assert child.seq_id not in self.tables, f"seq {child.seq_id} already has blocks"
        table = self._device_table(parent)
        for block_id in table:
            self.device.incref(block_id)
        self.tables[child.seq_id] = list(table)
        self._num_offered[child.seq_id] = self._num_offered.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's reference to each of its blocks, wherever its table lives."""
        pool = self.cpu if seq.seq_id in self.swapped else self.device
        self.swapped.discard(seq.seq_id)
        self._num_offered.pop(seq.seq_id, None)
        self._release(self.tables.pop(seq.seq_id), pool)

    # ---------------------------------------------------------------- swap

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self.num_distinct_blocks(seqs) <= self.cpu.num_free

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move a sequence group to CPU swap space, all or nothing; returns the
        (device, cpu) block pairs to copy. Blocks shared within the group move once."""
        assert not any(seq.seq_id in self.swapped for seq in seqs), "group already swapped out"
        assert self.can_swap_out(seqs), "not enough free CPU blocks: check can_swap_out"
        pairs = self._move(seqs, self.device, self.cpu)
        for seq in seqs:
            self.swapped.add(seq.seq_id)
            # The device copies stay cached until evicted; after swap-in the sequence's
            # blocks are offered to the cache again.
            self._num_offered.pop(seq.seq_id, None)
        return pairs

    def can_swap_in(self, seqs: list[Sequence]) -> bool:
        # No watermark: these sequences were admitted already.
        return self.num_distinct_blocks(seqs) <= self.device.num_free

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move a swapped-out sequence group back to fresh device blocks, all or nothing;
        returns the (cpu, device) block pairs to copy."""
        assert all(seq.seq_id in self.swapped for seq in seqs), "group not swapped out"
        assert self.can_swap_in(seqs), "not enough free device blocks: check can_swap_in"
        pairs = self._move(seqs, self.cpu, self.device)
        self.swapped.difference_update(seq.seq_id for seq in seqs)
        return pairs

    # ---------------------------------------------------------------- admin

    def stats(self) -> dict:
        """Block counts for the admin view, per pool: total, free, used, ``cached`` (free
        device blocks still holding a reusable prefix; always 0 on CPU), ``shared``
        (refcount > 1) and the refcount histogram of used blocks."""
        refcounts = self.device.refcounts
        cached = sum(1 for block_id in self.prefix_cache.blocks if refcounts[block_id] == 0)
        return {"device": {**self.device.stats(), "cached": cached},
                "cpu": {**self.cpu.stats(), "cached": 0},
                "prefix_cache": {"queries": self.prefix_queries, "hits": self.prefix_hits}}

    def slots(self, seqs: list[Sequence]) -> dict:
        """Token slots of the used device blocks: ``allocated`` (blocks x block size) and
        ``used`` (holding a token of one of ``seqs``, the sequences on the device).

        Every block but the last of a table is full, so only last blocks leave slots empty:
        O(len(seqs)), cheap enough for an admin poll."""
        last_fill: dict[int, int] = {}  # a last block shared by forks counts once
        for seq in seqs:
            table = self.tables.get(seq.seq_id)
            if table and seq.seq_id not in self.swapped:
                fill = min(self.block_size, seq.num_tokens - (len(table) - 1) * self.block_size)
                last_fill[table[-1]] = max(fill, last_fill.get(table[-1], 0))
        allocated = self.device.num_used * self.block_size
        empty = sum(self.block_size - fill for fill in last_fill.values())
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

    # ---------------------------------------------------------------- internals

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        # The last prompt token is always computed: its logits sample the first output.
        return self.prefix_cache.match(seq.token_ids, (seq.num_tokens - 1) // self.block_size)

    def _device_table(self, seq: Sequence) -> list[int]:
        assert seq.seq_id not in self.swapped, f"seq {seq.seq_id} is swapped out"
        return self.tables[seq.seq_id]

    def _allocate(self, pool: BlockPool) -> int:
        block_id = pool.allocate()
        if pool is self.device:
            self.prefix_cache.evict(block_id)  # reused: it no longer holds its old prefix
        return block_id

    def _move(self, seqs: list[Sequence], src: BlockPool, dst: BlockPool) -> list[tuple[int, int]]:
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = self.tables[seq.seq_id]
            for block_id in table:
                if block_id in mapping:
                    dst.incref(mapping[block_id])  # shared within the group: stays shared
                else:
                    mapping[block_id] = self._allocate(dst)
            self.tables[seq.seq_id] = [mapping[block_id] for block_id in table]
            self._release(table, src)
        return list(mapping.items())

    def num_distinct_blocks(self, seqs: list[Sequence]) -> int:
        return len({block_id for seq in seqs for block_id in self.tables[seq.seq_id]})

    @staticmethod
    def _release(table: list[int], pool: BlockPool) -> None:
        # Free in reverse: a sequence's tail blocks reach the free queue first, so they are
        # evicted before its head blocks, which other prompts are likelier to share.
        for block_id in reversed(table):
            pool.free(block_id)
