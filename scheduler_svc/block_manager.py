"""Block tables: which physical blocks hold each sequence's KV cache.

Mechanism only; the scheduler decides who runs. Paired check-and-act methods
(``can_allocate``/``allocate``, ``can_append_slot``/``append_slot``) make a lack of
memory a scheduling decision, never an exception in the middle of a step.
"""
from __future__ import annotations

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.sequence import Sequence


class BlockManager:
    def __init__(self, block_size: int, num_device_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01):
        self.block_size = block_size
        self.device = BlockPool(num_device_blocks)
        self.cpu = BlockPool(num_cpu_blocks)
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.tables: dict[int, list[int]] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        # Admission keeps a watermark free so running sequences can still grow.
        needed = self.blocks_needed(seq.num_tokens)
        return self.device.num_free - needed >= self.watermark_blocks

    def allocate(self, seq: Sequence) -> list[int]:
        """Give a waiting sequence blocks for all its tokens; returns its block table."""
        assert seq.seq_id not in self.tables, f"seq {seq.seq_id} already has blocks"
        table = [self.device.allocate() for _ in range(self.blocks_needed(seq.num_tokens))]
        self.tables[seq.seq_id] = table
        return table

    def can_append_slot(self, seq: Sequence) -> bool:
        return not self._needs_block(seq) or self.device.num_free > 0

    def append_slot(self, seq: Sequence) -> int | None:
        """Make room for the sequence's last token; returns a newly appended block id, if any."""
        if not self._needs_block(seq):
            return None
        # Tables only grow at the end: earlier entries never change while a sequence runs.
        block_id = self.device.allocate()
        self.tables[seq.seq_id].append(block_id)
        return block_id

    def free(self, seq: Sequence) -> None:
        # Free in reverse so the tail blocks are the first to be handed out again.
        for block_id in reversed(self.tables.pop(seq.seq_id)):
            self.device.free(block_id)

    def _needs_block(self, seq: Sequence) -> bool:
        return len(self.tables[seq.seq_id]) * self.block_size < seq.num_tokens
