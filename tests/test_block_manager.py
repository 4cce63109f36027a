"""Block manager invariants under random allocate / append / free, checked after every step."""
from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, list(range(num_tokens)), request=None)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(BLOCK_SIZE, num_device_blocks=24, num_cpu_blocks=8, watermark=0.0)
        self.seqs: dict[int, Sequence] = {}
        self.next_id = 0

    @rule(num_tokens=st.integers(1, 40))
    def allocate(self, num_tokens):
        seq = make_seq(self.next_id, num_tokens)
        self.next_id += 1
        if self.bm.can_allocate(seq):
            table = self.bm.allocate(seq)
            assert len(table) == -(-num_tokens // BLOCK_SIZE)
            self.seqs[seq.seq_id] = seq
        else:
            assert self.bm.device.num_free < -(-num_tokens // BLOCK_SIZE)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def append(self, data):
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        seq.token_ids.append(0)
        if self.bm.can_append_slot(seq):
            before = list(self.bm.tables[seq.seq_id])
            new_block = self.bm.append_slot(seq)
            after = self.bm.tables[seq.seq_id]
            assert after[:len(before)] == before  # tables only grow at the end
            assert (new_block is None) == (after == before)
        else:
            seq.token_ids.pop()
            assert self.bm.device.num_free == 0

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = self.seqs.pop(data.draw(st.sampled_from(sorted(self.seqs))))
        self.bm.free(seq)

    @invariant()
    def free_plus_used_is_total(self):
        for pool in (self.bm.device, self.bm.cpu):
            assert pool.num_free + pool.num_used == pool.num_blocks

    @invariant()
    def refcount_equals_table_references(self):
        refs = Counter(b for table in self.bm.tables.values() for b in table)
        for block_id, refcount in enumerate(self.bm.device.refcounts):
            assert refcount == refs.get(block_id, 0)

    @invariant()
    def no_block_is_free_and_referenced(self):
        referenced = {b for table in self.bm.tables.values() for b in table}
        assert not referenced & set(self.bm.device.free_ids)
        assert len(set(self.bm.device.free_ids)) == self.bm.device.num_free

    @invariant()
    def every_token_has_a_slot(self):
        for seq in self.seqs.values():
            assert len(self.bm.tables[seq.seq_id]) * BLOCK_SIZE >= seq.num_tokens

    def teardown(self):
        for seq in self.seqs.values():
            self.bm.free(seq)
        assert self.bm.device.num_free == self.bm.device.num_blocks  # nothing leaks


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_watermark_keeps_blocks_free_at_admission():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=10, num_cpu_blocks=0, watermark=0.2)
    assert bm.can_allocate(make_seq(0, 8 * BLOCK_SIZE))
    assert not bm.can_allocate(make_seq(1, 9 * BLOCK_SIZE))


def test_free_returns_tail_blocks_to_the_pool_first():
    bm = BlockManager(BLOCK_SIZE, num_device_blocks=6, num_cpu_blocks=0, watermark=0.0)
    a = make_seq(0, 3 * BLOCK_SIZE)
    bm.allocate(a)
    table = list(bm.tables[0])
    bm.free(a)
    b = make_seq(1, 1)
    bm.allocate(b)
    # never-used blocks go out first; a's blocks queue behind them, tail first
    assert bm.tables[1] == [3]
    assert list(bm.device.free_ids)[-3:] == table[::-1]
