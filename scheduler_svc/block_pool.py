"""A pool of physical KV blocks: refcounts and an LRU free queue, O(1) allocate and free."""
from __future__ import annotations

from collections import OrderedDict

from pagedserve.scheduler_svc.block_snapshot import PoolSnapshot


class BlockPool:
    """Owns ``num_blocks`` physical block ids of one memory (device or CPU swap space).

    Free blocks wait in an LRU queue: ``free`` appends a block at the tail, ``allocate``
    takes the head. A free device block may still hold a cached prefix; a cache hit takes it
    back out of the queue (``incref``), so the longer a block stays unused the sooner it is
    evicted by reuse.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcounts = [0] * num_blocks
        # Keyed by block id: pop the head, append at the tail or remove any block in O(1).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """Take the least recently freed block, with one reference."""
        if not self.free_queue:
            raise RuntimeError(f"block pool of {self.num_blocks} blocks exhausted: callers "
                               f"must check can_allocate / can_append_slot / can_swap_* first")
        block_id, _ = self.free_queue.popitem(last=False)
        self.refcounts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Add a reference; a free block (a cached prefix hit) leaves the free queue."""
        if self.refcounts[block_id] == 0:
            del self.free_queue[block_id]
        self.refcounts[block_id] += 1

    def free(self, block_id: int) -> None:
        """Drop one reference; with none left the block joins the tail of the free queue."""
        assert self.refcounts[block_id] > 0, f"block {block_id} freed twice"
        self.refcounts[block_id] -= 1
        if self.refcounts[block_id] == 0:
            self.free_queue[block_id] = None

    def snapshot(self) -> PoolSnapshot:
        """A copy of the refcounts and the free queue, for read-only views."""
        return PoolSnapshot(tuple(self.refcounts), tuple(self.free_queue))
