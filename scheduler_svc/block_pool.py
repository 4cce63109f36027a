"""A pool of physical KV blocks: free list and refcounts, O(1) allocate and free."""
from __future__ import annotations

from collections import deque


class BlockPool:
    """Owns ``num_blocks`` physical block ids of one memory (device or CPU swap space)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcounts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise RuntimeError("block pool exhausted: callers must check num_free first")
        block_id = self.free_ids.popleft()
        self.refcounts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        assert self.refcounts[block_id] > 0, f"block {block_id} is free"
        self.refcounts[block_id] += 1

    def free(self, block_id: int) -> None:
        """Drop one reference; the block returns to the free list when none is left."""
        assert self.refcounts[block_id] > 0, f"block {block_id} freed twice"
        self.refcounts[block_id] -= 1
        if self.refcounts[block_id] == 0:
            self.free_ids.append(block_id)
