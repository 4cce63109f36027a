"""Block manager: invariants under random operations, and the paper's mechanisms one by one."""
from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedserve.scheduler_svc import prefix_cache
from pagedserve.scheduler_svc.block_manager import AppendResult, BlockManager
from pagedserve.scheduler_svc.sequence import Sequence

BLOCK_SIZE = 4
# Prompts start with a prefix of one of these, so that prefix-cache hits are common.
PREFIXES = [[1] * 16, [1] * 8 + [2] * 8, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, list(range(num_tokens)), request=None)


def compute(bm: BlockManager, seq: Sequence) -> None:
    """What an acknowledged step does: every token computed, full blocks offered to the cache."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random operations against a shadow of each block's KV (the token prefix it holds)."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(BLOCK_SIZE, num_device_blocks=24, num_cpu_blocks=12, watermark=0.0)
        self.seqs: dict[int, Sequence] = {}
        self.groups: dict[int, list[Sequence]] = {}  # a group swaps as a whole
        self.group_of: dict[int, int] = {}
        self.device_kv: dict[int, tuple[int, ...]] = {}
        self.cpu_kv: dict[int, tuple[int, ...]] = {}
        self.next_id = 0

    # ------------------------------------------------------------ helpers

    def _new_seq(self, tokens: list[int]) -> Sequence:
        seq = Sequence(self.next_id, tokens, request=None)
        self.next_id += 1
        return seq

    def _add(self, seq: Sequence, group: int) -> None:
        self.seqs[seq.seq_id] = seq
        self.group_of[seq.seq_id] = group
        self.groups.setdefault(group, []).append(seq)

    def _on_device(self, seq: Sequence) -> bool:
        return seq.seq_id not in self.bm.snapshot().swapped

    def _draw(self, data, keep) -> Sequence:
        return data.draw(st.sampled_from([s for _, s in sorted(self.seqs.items()) if keep(s)]))

    def _done(self, seq: Sequence) -> bool:
        return self._on_device(seq) and seq.num_computed_tokens == seq.num_tokens

    def _pending(self, seq: Sequence) -> bool:
        return self._on_device(seq) and seq.num_computed_tokens < seq.num_tokens

    def _group(self, data, on_device: bool) -> list[Sequence]:
        gids = sorted(g for g, seqs in self.groups.items() if self._on_device(seqs[0]) == on_device)
        return self.groups[data.draw(st.sampled_from(gids))]

    def _has_group(self, on_device: bool) -> bool:
        return any(self._on_device(seqs[0]) == on_device for seqs in self.groups.values())

    # ------------------------------------------------------------ rules

    @rule(family=st.integers(0, len(PREFIXES) - 1), num_blocks=st.integers(0, 4),
          tail=st.lists(st.integers(0, 3), max_size=6))
    def allocate(self, family, num_blocks, tail):
        seq = self._new_seq(PREFIXES[family][:num_blocks * BLOCK_SIZE] + tail or [0])
        num_free = self.bm.snapshot().device.num_free
        if not self.bm.can_allocate(seq):
            assert num_free < self.bm.blocks_needed(seq.num_tokens)
            return
        table = self.bm.allocate(seq)
        assert len(table) == self.bm.blocks_needed(seq.num_tokens)
        assert self.bm.table(seq.seq_id) == tuple(table)
        device = self.bm.snapshot().device
        hits = table[:seq.num_computed_tokens // BLOCK_SIZE]
        hits_in_use = sum(1 for block_id in hits if device.refcounts[block_id] > 1)
        assert num_free - device.num_free == len(table) - hits_in_use
        assert seq.num_computed_tokens <= seq.num_tokens - 1  # the last token is computed
        for i in range(seq.num_computed_tokens // BLOCK_SIZE):  # a hit serves the right KV
            assert self.device_kv[table[i]] == tuple(seq.token_ids[:(i + 1) * BLOCK_SIZE])
        self._add(seq, seq.seq_id)

    @rule(num_tokens=st.integers(1, 24))
    def evict_by_allocation(self, num_tokens):
        seq = self._new_seq([1000 + self.next_id] * num_tokens)  # never cached
        if self.bm.can_allocate(seq):
            head = list(self.bm.snapshot().device.free_queue)[:self.bm.blocks_needed(num_tokens)]
            assert self.bm.allocate(seq) == head  # least recently freed first
            assert not set(head) & set(self.bm.snapshot().prefix_cache.blocks)  # evicted
            self._add(seq, seq.seq_id)

    @precondition(lambda self: any(self._pending(s) for s in self.seqs.values()))
    @rule(data=st.data(), cache=st.booleans())
    def execute(self, data, cache):
        """The executor computes a sequence's pending tokens; the scheduler, once the step is
        acknowledged, usually offers the new full blocks to the cache right away."""
        seq = self._draw(data, self._pending)
        table, refcounts = self.bm.table(seq.seq_id), self.bm.snapshot().device.refcounts
        for pos in range(seq.num_computed_tokens, seq.num_tokens):
            block_id = table[pos // BLOCK_SIZE]
            assert refcounts[block_id] == 1, "wrote into a shared block"
            self.device_kv[block_id] = tuple(seq.token_ids[:pos + 1])
        seq.num_computed_tokens = seq.num_tokens
        if cache:
            self.bm.cache_computed_blocks(seq)

    @precondition(lambda self: any(self._on_device(s) for s in self.seqs.values()))
    @rule(data=st.data())
    def cache_computed_blocks(self, data):
        self.bm.cache_computed_blocks(self._draw(data, self._on_device))

    @precondition(lambda self: any(self._done(s) for s in self.seqs.values()))
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data, token):
        seq = self._draw(data, self._done)
        seq.token_ids.append(token)
        if not self.bm.can_append_slots([seq]):
            seq.token_ids.pop()
            assert self.bm.snapshot().device.num_free == 0
            return
        before = list(self.bm.table(seq.seq_id))
        result = self.bm.append_slot(seq)
        after = list(self.bm.table(seq.seq_id))
        if result.new_block is not None:
            assert after == before + [result.new_block]
        elif result.cow is not None:
            src, dst = result.cow
            assert src == before[-1] and after == before[:-1] + [dst]
            self.device_kv[dst] = self.device_kv[src]
        else:
            assert result == AppendResult() and after == before

    @precondition(lambda self: any(all(map(self._done, g)) for g in self.groups.values()))
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=8, max_size=8))
    def append_group(self, data, tokens):
        """A group decodes together: ``num_append_blocks`` predicts exactly how many fresh
        blocks the appends take (new blocks and copies of shared last blocks)."""
        gids = sorted(g for g, seqs in self.groups.items() if all(map(self._done, seqs)))
        group = self.groups[data.draw(st.sampled_from(gids))]
        for seq, token in zip(group, tokens * len(group)):
            seq.token_ids.append(token)
        needed = self.bm.num_append_blocks(group)
        free_before = self.bm.snapshot().device.num_free
        if not self.bm.can_append_slots(group):
            assert needed > free_before
            for seq in group:
                seq.token_ids.pop()
            return
        for seq in group:
            cow = self.bm.append_slot(seq).cow
            if cow is not None:
                self.device_kv[cow[1]] = self.device_kv[cow[0]]
        assert free_before - self.bm.snapshot().device.num_free == needed

    @precondition(lambda self: any(self._done(s) for s in self.seqs.values()))
    @rule(data=st.data())
    def fork(self, data):
        parent = self._draw(data, self._done)
        child = self._new_seq(parent.token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.bm.fork(parent, child)
        assert self.bm.table(child.seq_id) == self.bm.table(parent.seq_id)
        self._add(child, self.group_of[parent.seq_id])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = self._draw(data, lambda s: True)
        self.bm.free(seq)
        del self.seqs[seq.seq_id]
        group_id = self.group_of.pop(seq.seq_id)
        self.groups[group_id].remove(seq)
        if not self.groups[group_id]:
            del self.groups[group_id]

    @precondition(lambda self: self._has_group(on_device=True))
    @rule(data=st.data())
    def swap_out(self, data):
        self._swap(self._group(data, on_device=True), self.bm.can_swap_out, self.bm.swap_out,
                   "cpu", 0, self.device_kv, self.cpu_kv)

    @precondition(lambda self: self._has_group(on_device=False))
    @rule(data=st.data())
    def swap_in(self, data):
        # Swapped in, each sequence may take a block for its next token right away.
        group = self._group(data, on_device=False)
        self._swap(group, self.bm.can_swap_in, self.bm.swap_in, "device", len(group),
                   self.cpu_kv, self.device_kv)

    def _swap(self, seqs, can_swap, swap, dst_pool, reserve, src_kv, dst_kv):
        before = {seq.seq_id: self.bm.table(seq.seq_id) for seq in seqs}
        distinct = {block_id for table in before.values() for block_id in table}
        if not can_swap(seqs):
            assert len(distinct) + reserve > getattr(self.bm.snapshot(), dst_pool).num_free
            return
        pairs = swap(seqs)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs) and set(mapping) == distinct  # each block moved once
        assert len(set(mapping.values())) == len(mapping)
        for seq_id, table in before.items():
            assert self.bm.table(seq_id) == tuple(mapping[block_id] for block_id in table)
        for src, dst in pairs:
            if src in src_kv:
                dst_kv[dst] = src_kv[src]
            else:
                dst_kv.pop(dst, None)

    # ------------------------------------------------------------ invariants

    @invariant()
    def free_plus_used_is_total(self):
        snap = self.bm.snapshot()
        for pool in (snap.device, snap.cpu):
            used = sum(1 for refcount in pool.refcounts if refcount > 0)
            assert pool.num_free + used == pool.num_blocks == pool.num_free + pool.num_used

    @invariant()
    def refcount_equals_table_references(self):
        snap = self.bm.snapshot()
        for pool, on_device in ((snap.device, True), (snap.cpu, False)):
            refs = Counter(block_id for seq_id, table in snap.tables.items()
                           if (seq_id not in snap.swapped) == on_device for block_id in table)
            assert pool.refcounts == tuple(refs[block_id] for block_id in range(pool.num_blocks))

    @invariant()
    def no_block_is_free_and_referenced(self):
        snap = self.bm.snapshot()
        for pool in (snap.device, snap.cpu):
            free = set(pool.free_queue)
            assert free == {b for b in range(pool.num_blocks) if pool.refcounts[b] == 0}

    @invariant()
    def every_token_has_a_slot_in_a_block_of_its_own_table(self):
        for seq in self.seqs.values():
            table = self.bm.table(seq.seq_id)
            assert len(table) * BLOCK_SIZE >= seq.num_tokens and len(set(table)) == len(table)

    @invariant()
    def cached_blocks_hold_the_prefix_they_name(self):
        cache = self.bm.snapshot().prefix_cache
        assert len(cache.block_of) == len(cache.blocks)
        for block_id, cached in cache.blocks.items():
            assert cache.block_of[cached.hash] == block_id
            prefix, parent = cached.token_ids, cached.parent
            while parent is not None:
                assert parent in cache.blocks, f"cached block {block_id} outlived its parent"
                prefix = cache.blocks[parent].token_ids + prefix
                parent = cache.blocks[parent].parent
            assert self.device_kv[block_id] == prefix

    @invariant()
    def admin_views_agree_with_a_block_by_block_count(self):
        snap = self.bm.snapshot()
        stats, states = snap.stats(), snap.block_states()
        for name, pool in (("device", snap.device), ("cpu", snap.cpu)):
            used = [r for r in pool.refcounts if r > 0]
            assert stats[name]["free"] + stats[name]["used"] == stats[name]["total"]
            assert stats[name]["shared"] == sum(1 for r in used if r > 1)
            assert stats[name]["refcounts"] == {str(r): n for r, n in sorted(Counter(used).items())}
        cached = [b for b in snap.prefix_cache.blocks if snap.device.refcounts[b] == 0]
        assert stats["device"]["cached"] == len(cached)
        assert Counter(states["device"]) == Counter({
            ".": snap.device.num_free - len(cached), "c": len(cached),
            "u": stats["device"]["used"] - stats["device"]["shared"],
            "s": stats["device"]["shared"]}) - Counter()
        assert states["cpu"].count("w") == stats["cpu"]["used"]
        fill: dict[int, int] = {}  # block -> tokens in it, over the sequences on the device
        on_device = [seq for seq in self.seqs.values() if seq.seq_id not in snap.swapped]
        for seq in on_device:
            for i, block_id in enumerate(snap.tables[seq.seq_id]):
                tokens = max(0, min(BLOCK_SIZE, seq.num_tokens - i * BLOCK_SIZE))
                fill[block_id] = max(fill.get(block_id, 0), tokens)
        assert snap.slots(on_device) == {"used": sum(fill.values()),
                                         "allocated": BLOCK_SIZE * snap.device.num_used}

    def teardown(self):
        for seq in self.seqs.values():
            self.bm.free(seq)
        snap = self.bm.snapshot()
        assert not snap.tables and not snap.swapped
        for pool in (snap.device, snap.cpu):
            assert pool.num_free == pool.num_blocks  # nothing leaks


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------- admission

def test_watermark_keeps_blocks_free_at_admission():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=10, num_cpu_blocks=0, watermark=0.2)
    assert bm.can_allocate(make_seq(0, 8 * BLOCK_SIZE))
    assert not bm.can_allocate(make_seq(1, 9 * BLOCK_SIZE))


def test_free_returns_tail_blocks_to_the_pool_first():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=6, num_cpu_blocks=0, watermark=0.0)
    a = make_seq(0, 3 * BLOCK_SIZE)
    table = list(bm.allocate(a))
    bm.free(a)
    bm.allocate(make_seq(1, 1))
    # never-used blocks go out first; a's blocks queue behind them, tail first
    assert bm.table(1) == (3,)
    assert list(bm.snapshot().device.free_queue)[-3:] == table[::-1]


def test_a_sequence_fits_the_pool_less_the_watermark_and_usage_counts_used_blocks():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=10, num_cpu_blocks=0, watermark=0.2)
    assert bm.max_seq_len == 8 * BLOCK_SIZE and bm.usage == 0.0
    bm.allocate(make_seq(0, 3 * BLOCK_SIZE))
    assert bm.usage == 0.3
    assert BlockManager(BLOCK_SIZE, 0, 0).usage == 0.0


def test_free_of_a_sequence_without_blocks_changes_nothing():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    held, waiting = make_seq(0, BLOCK_SIZE), make_seq(1, BLOCK_SIZE)
    bm.allocate(held)
    bm.free(waiting)
    assert bm.table(held.seq_id) == (0,) and bm.table(waiting.seq_id) == ()
    assert bm.snapshot().device.num_free == 3


def test_tables_and_snapshots_are_copies_that_never_change_the_blocks():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    seq = make_seq(0, BLOCK_SIZE)
    bm.allocate(seq).append(3)
    snap = bm.snapshot()
    seq.append_token(1, 0.0)
    bm.append_slot(seq)
    assert snap.tables == {0: (0,)} and bm.table(0) == (0, 1)
    assert snap.device.num_free == 3 and bm.snapshot().device.num_free == 2


# ---------------------------------------------------------------- decode

def test_needs_block_when_the_last_block_is_full_or_shared():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0)
    parent, child = make_seq(0, BLOCK_SIZE + 1), make_seq(1, BLOCK_SIZE + 1)
    bm.allocate(parent)
    assert not bm.needs_block(parent)  # room in its own partial last block
    bm.fork(parent, child)
    assert bm.needs_block(parent) and bm.needs_block(child)  # shared: copy-on-write
    child.append_token(9, 0.0)
    bm.append_slot(child)
    assert not bm.needs_block(parent)  # its last block is its own again
    parent.token_ids += [7] * BLOCK_SIZE
    assert bm.needs_block(parent)  # its last block is full


def test_appends_ahead_take_the_next_block_one_token_early():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=2, num_cpu_blocks=0, watermark=0.0)
    seq = make_seq(0, BLOCK_SIZE)
    bm.allocate(seq)
    assert bm.num_append_blocks([seq]) == 0 and bm.num_append_blocks([seq], ahead=1) == 1
    assert bm.can_append_slots([seq], ahead=1)
    assert bm.append_slot(seq, ahead=1).new_block == 1
    assert not bm.can_append_slots([seq], ahead=BLOCK_SIZE + 1)  # the pool is empty


def test_writers_of_a_shared_last_block_copy_it_all_but_the_last_holder():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    seqs = [make_seq(i, 2) for i in range(3)]
    bm.allocate(seqs[0])
    for child in seqs[1:]:
        bm.fork(seqs[0], child)
    assert bm.num_append_blocks(seqs) == 2  # the third writer keeps the block
    assert bm.num_append_blocks(seqs[1:]) == 2  # the parent still holds it
    assert bm.can_append_slots(seqs)
    bm.allocate(make_seq(3, 2 * BLOCK_SIZE))  # two of the three free blocks
    assert not bm.can_append_slots(seqs) and bm.can_append_slots(seqs[:1])


# ---------------------------------------------------------------- fork and copy-on-write

def test_fork_shares_blocks_until_write():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0)
    parent, child = make_seq(0, 6), make_seq(1, 6)
    first, last = bm.allocate(parent)
    compute(bm, parent)
    bm.fork(parent, child)
    assert bm.table(1) == (first, last) and bm.snapshot().device.refcounts[last] == 2
    child.append_token(9, 0.0)
    result = bm.append_slot(child)  # writes into the shared partial last block
    assert result.new_block is None and result.cow[0] == last
    assert bm.table(1) == (first, result.cow[1])
    refcounts = bm.snapshot().device.refcounts
    assert refcounts[first] == 2 and refcounts[last] == 1
    parent.append_token(8, 0.0)
    assert bm.append_slot(parent) == AppendResult()  # the last block is its own again


def test_a_full_shared_block_gets_a_new_block_not_a_copy():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0)
    parent, child = make_seq(0, BLOCK_SIZE), make_seq(1, BLOCK_SIZE)
    bm.allocate(parent)
    bm.fork(parent, child)
    child.append_token(9, 0.0)
    result = bm.append_slot(child)
    assert result.cow is None and bm.table(1) == bm.table(0) + (result.new_block,)


# ---------------------------------------------------------------- prefix cache

def test_prefix_hit_computes_only_the_remaining_tokens():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    prefix = list(range(3 * BLOCK_SIZE))
    a = Sequence(0, prefix + [50, 51], request=None)
    table_a = bm.allocate(a)
    assert a.num_computed_tokens == 0
    compute(bm, a)
    b = Sequence(1, prefix + [60, 61, 62], request=None)
    table_b = bm.allocate(b)
    assert b.num_computed_tokens == 3 * BLOCK_SIZE  # only 3 tokens left to compute
    assert table_b[:3] == table_a[:3] and table_b[3] != table_a[3]
    assert [bm.snapshot().device.refcounts[block_id] for block_id in table_b] == [2, 2, 2, 1]


def test_reset_prefix_cache_is_refused_while_blocks_are_held_then_forgets_every_prefix():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    prompt = list(range(3 * BLOCK_SIZE + 1))
    first = Sequence(0, prompt, request=None)
    bm.allocate(first)
    compute(bm, first)
    assert not bm.reset_prefix_cache()  # first still holds its blocks
    bm.free(first)
    assert bm.reset_prefix_cache()
    snap = bm.snapshot()
    assert snap.stats()["device"]["cached"] == 0 and snap.device.num_free == 16
    again = Sequence(1, prompt, request=None)
    bm.allocate(again)
    assert again.num_computed_tokens == 0


def test_only_computed_blocks_are_cached():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    a = make_seq(0, 3 * BLOCK_SIZE)
    bm.allocate(a)
    a.num_computed_tokens = 2 * BLOCK_SIZE - 1  # the step computing the rest is in flight
    bm.cache_computed_blocks(a)
    assert len(bm.snapshot().prefix_cache.match(list(range(3 * BLOCK_SIZE)), 3)) == 1


def test_last_prompt_token_is_computed_even_when_the_whole_prompt_is_cached():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    a = make_seq(0, 3 * BLOCK_SIZE)
    table_a = bm.allocate(a)
    compute(bm, a)
    b = make_seq(1, 3 * BLOCK_SIZE)
    table_b = bm.allocate(b)
    assert b.num_computed_tokens == 2 * BLOCK_SIZE
    assert table_b[:2] == table_a[:2] and table_b[2] != table_a[2]


def _constant_hash(parent_hash, token_ids):
    return 0


def _hash_ignoring_the_parent(parent_hash, token_ids):
    return hash(token_ids)


# Blocks cached from x+y and z+y, then how many blocks each prompt finds cached.
@pytest.mark.parametrize("fake_hash,expected", [
    (_constant_hash, {"yy": 0, "zx": 0, "xy": 1, "zy": 0}),  # only x is indexed
    (_hash_ignoring_the_parent, {"yy": 0, "zx": 1, "xy": 2, "zy": 1}),  # x, x+y and z
])
def test_a_hash_collision_never_serves_another_prefix(monkeypatch, fake_hash, expected):
    monkeypatch.setattr(prefix_cache, "hash_block", fake_hash)
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=32, num_cpu_blocks=0, watermark=0.0)
    blocks = {name: [i + 1] * BLOCK_SIZE for i, name in enumerate("xyz")}
    for seq_id, prompt in enumerate(["xy", "zy"]):
        seq = Sequence(seq_id, blocks[prompt[0]] + blocks[prompt[1]] + [0], request=None)
        bm.allocate(seq)
        compute(bm, seq)
    # Whatever the hashes say, a hit needs the same tokens after the same parent block.
    for seq_id, (prompt, num_cached) in enumerate(expected.items(), start=2):
        seq = Sequence(seq_id, blocks[prompt[0]] + blocks[prompt[1]] + [0], request=None)
        bm.allocate(seq)
        assert seq.num_computed_tokens == num_cached * BLOCK_SIZE, prompt


def test_a_freed_cached_block_is_reused_from_the_free_queue():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    a, other = make_seq(0, 2 * BLOCK_SIZE), Sequence(1, [9] * 2 * BLOCK_SIZE, request=None)
    table_a = bm.allocate(a)
    compute(bm, a)
    table_other = bm.allocate(other)
    bm.free(a)
    bm.free(other)
    snap = bm.snapshot()
    assert list(snap.device.free_queue) == table_a[::-1] + table_other[::-1]
    assert snap.stats()["device"] == {"total": 4, "free": 4, "used": 0, "cached": 2,
                                      "shared": 0, "refcounts": {}}
    # Two hits (free) plus three fresh blocks would need 5 of the 4 free blocks.
    assert not bm.can_allocate(make_seq(2, 4 * BLOCK_SIZE + 1))
    b = make_seq(2, 2 * BLOCK_SIZE + 1)
    assert bm.can_allocate(b)
    # The hits leave the queue before the fresh block is taken from its head.
    assert bm.allocate(b) == table_a + [table_other[-1]]
    assert list(bm.snapshot().device.free_queue) == [table_other[0]]


def test_hits_on_running_blocks_need_no_free_blocks():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    a = make_seq(0, 2 * BLOCK_SIZE + 1)
    bm.allocate(a)
    compute(bm, a)
    assert bm.snapshot().device.num_free == 1
    assert not bm.can_allocate(make_seq(1, 3 * BLOCK_SIZE + 1))  # 2 hits + 2 fresh
    b = make_seq(1, 3 * BLOCK_SIZE)  # 2 hits + 1 fresh
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.snapshot().stats()["device"]["shared"] == 2


def test_lru_eviction_takes_the_least_recently_freed_and_tail_blocks_first():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=6, num_cpu_blocks=0, watermark=0.0)
    prompts = [[1] * 2 * BLOCK_SIZE + [0], [2] * 2 * BLOCK_SIZE + [0]]
    seqs = [Sequence(seq_id, tokens, request=None) for seq_id, tokens in enumerate(prompts)]
    for seq in seqs:
        bm.allocate(seq)
        compute(bm, seq)
    for seq in seqs:  # the first is freed least recently
        bm.free(seq)
    bm.allocate(Sequence(2, [7] * BLOCK_SIZE, request=None))  # the first's uncached tail
    bm.allocate(Sequence(3, [8] * BLOCK_SIZE, request=None))  # evicts the first's 2nd block
    cache = bm.snapshot().prefix_cache
    assert [len(cache.match(tokens, 2)) for tokens in prompts] == [1, 2]


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0,
                      enable_prefix_caching=False)
    a = make_seq(0, 2 * BLOCK_SIZE + 1)
    bm.allocate(a)
    compute(bm, a)
    b = make_seq(1, 2 * BLOCK_SIZE + 1)
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and not bm.snapshot().prefix_cache.blocks


# ---------------------------------------------------------------- swap

def test_swap_round_trip_keeps_sharing_within_a_group():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=4, watermark=0.0)
    parent, child = make_seq(0, 6), make_seq(1, 6)
    bm.allocate(parent)
    compute(bm, parent)
    bm.fork(parent, child)
    assert bm.can_swap_out([parent, child])
    out = bm.swap_out([parent, child])
    assert len(out) == 2  # each shared block moved once
    cpu_table = tuple(cpu for _, cpu in out)
    snap = bm.snapshot()
    assert snap.tables == {0: cpu_table, 1: cpu_table} and snap.swapped == {0, 1}
    assert [snap.cpu.refcounts[block_id] for block_id in cpu_table] == [2, 2]
    assert snap.device.num_free == 8
    assert bm.can_swap_in([parent, child])
    back = bm.swap_in([parent, child])
    assert tuple(cpu for cpu, _ in back) == cpu_table
    device_table = tuple(device for _, device in back)
    snap = bm.snapshot()
    assert snap.tables == {0: device_table, 1: device_table} and not snap.swapped
    assert [snap.device.refcounts[block_id] for block_id in device_table] == [2, 2]
    assert snap.cpu.num_free == 4


def test_swap_in_keeps_a_block_free_for_each_sequences_next_token():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=4, num_cpu_blocks=4, watermark=0.0)
    parent, child = make_seq(0, BLOCK_SIZE), make_seq(1, BLOCK_SIZE)
    bm.allocate(parent)
    bm.fork(parent, child)
    bm.swap_out([parent, child])  # one shared block on CPU
    other = make_seq(2, 2 * BLOCK_SIZE)
    bm.allocate(other)  # two of the four device blocks
    assert not bm.can_swap_in([parent, child])  # 1 block + 2 next tokens > 2 free
    bm.free(other)
    assert bm.can_swap_in([parent, child])
    bm.swap_in([parent, child])
    for seq in (parent, child):
        seq.append_token(5, 0.0)
    assert bm.can_append_slots([parent, child])


def test_cannot_swap_out_when_the_cpu_pool_is_too_small():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=1, watermark=0.0)
    seq = make_seq(0, BLOCK_SIZE + 1)
    bm.allocate(seq)
    assert not bm.can_swap_out([seq])


def test_a_swapped_out_sequence_frees_its_cpu_blocks():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=8, num_cpu_blocks=4, watermark=0.0)
    seq = make_seq(0, BLOCK_SIZE + 1)
    bm.allocate(seq)
    bm.swap_out([seq])
    bm.free(seq)
    snap = bm.snapshot()
    assert snap.cpu.num_free == 4 and snap.device.num_free == 8 and not snap.swapped
