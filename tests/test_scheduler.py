"""Continuous-batching policy against a simulated executor."""
import random
from collections import Counter

from hypothesis import given, settings, strategies as st

from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request, SequenceStatus
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession

BLOCK_SIZE = 4


def session(bm: BlockManager) -> ExecutorSession:
    """A ready executor's session over ``bm``, without a cost model."""
    return ExecutorSession(bm, ContextLimit(bm.max_seq_len, "the KV pool holds no more"))


def attached(bm, *args, **kwargs) -> Scheduler:
    """A scheduler (``Scheduler(*args, **kwargs)``) with an executor session over ``bm``."""
    scheduler = Scheduler(*args, **kwargs)
    scheduler.attach(session(bm))
    return scheduler


def make_scheduler(num_blocks=64, max_num_seqs=8, max_batched=64, watermark=0.0):
    return attached(BlockManager(BLOCK_SIZE, num_blocks, 0, watermark), max_num_seqs, max_batched)


def blocks(scheduler):
    """A snapshot of the scheduler's blocks."""
    return scheduler.session.block_manager.snapshot()


def add(scheduler, request_id, prompt_len, max_tokens=4, **params):
    """Queue a request; returns its first sequence (ids count up from 0 in order of adds)."""
    request = Request(str(request_id), b"c", SamplingParams(max_tokens=max_tokens, **params),
                      list(range(prompt_len)), stream=False)
    scheduler.add(request)
    return request.seqs[0]


def run_step(scheduler):
    """Schedule, 'execute' (every seq that completes its tokens samples one), acknowledge."""
    step = scheduler.schedule()
    scheduler.update(step)
    for seq in step.seqs:
        if seq.num_computed_tokens < seq.num_tokens:
            continue  # a prompt chunk: nothing sampled yet
        seq.append_token(7, 0.0)
        if seq.num_output_tokens >= seq.request.params.max_tokens:
            scheduler.finish(seq, "length")
    return step


def test_admits_in_arrival_order_chunking_the_prompt_that_meets_the_budget():
    scheduler = make_scheduler(max_batched=20)
    seqs = [add(scheduler, i, 8) for i in range(4)]
    step = scheduler.schedule()
    assert step.seqs == seqs[:3] and step.num_tokens == [8, 8, 4]  # the third gets a chunk
    assert list(scheduler.waiting) == seqs[3:]


def test_long_prompt_is_prefilled_in_chunks_beside_decodes():
    scheduler = make_scheduler(max_batched=8)
    short = add(scheduler, 0, 3, max_tokens=10)
    run_step(scheduler)
    long = add(scheduler, 1, 20)
    chunks = []
    while long.num_output_tokens == 0:
        step = scheduler.schedule()
        assert step.seqs[0] is short and step.num_tokens[0] == 1  # decodes go first
        assert sum(step.num_tokens) <= 8
        chunks.append(dict(zip(step.seqs, step.num_tokens))[long])
        scheduler.update(step)
        for seq in step.seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(7, 0.0)
    assert chunks == [7, 7, 6] and long.num_output_tokens == 1


def test_max_num_seqs_bounds_the_batch():
    scheduler = make_scheduler(max_num_seqs=3)
    for i in range(5):
        add(scheduler, i, 2)
    assert len(scheduler.schedule().seqs) == 3


def test_head_of_queue_is_not_overtaken_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=4)
    add(scheduler, 0, 3 * BLOCK_SIZE)
    big = add(scheduler, 1, 2 * BLOCK_SIZE)
    add(scheduler, 2, 1)
    step = scheduler.schedule()
    assert [s.seq_id for s in step.seqs] == [0]
    assert scheduler.waiting[0] is big and len(scheduler.waiting) == 2


def test_decode_steps_carry_one_token_and_new_blocks_only_at_boundaries():
    scheduler = make_scheduler()
    seq = add(scheduler, 0, BLOCK_SIZE, max_tokens=10)
    first = run_step(scheduler)
    assert first.new_seqs == [seq] and first.block_appends == []
    second = scheduler.schedule()
    assert second.new_seqs == [] and second.num_tokens == [1]
    assert second.block_appends == [(0, blocks(scheduler).tables[0][-1])]


def test_latest_arrival_is_preempted_for_recompute_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=2, max_num_seqs=2)
    old = add(scheduler, 0, BLOCK_SIZE, max_tokens=8)
    new = add(scheduler, 1, BLOCK_SIZE, max_tokens=8)
    run_step(scheduler)
    step = scheduler.schedule()  # both need a second block; only the older gets it
    assert step.seqs == [old] and step.removed == [1]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new and scheduler.preemptions == {"swap": 0, "recompute": 1}
    assert 1 not in blocks(scheduler).tables


def test_finished_blocks_are_released_only_at_the_next_schedule():
    scheduler = make_scheduler()
    seq = add(scheduler, 0, 5, max_tokens=1)
    run_step(scheduler)
    assert seq.is_finished and 0 in blocks(scheduler).tables  # step may be in flight
    step = scheduler.schedule()
    assert step.removed == [0] and not blocks(scheduler).tables


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=20),
       st.integers(8, 40), st.integers(0, 2**16))
def test_every_request_completes_and_the_pool_ends_empty(requests, num_blocks, seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=num_blocks, max_num_seqs=4, max_batched=64)
    # every request fits the pool on its own, as the service guarantees via max_model_len
    requests = [(p, m) for p, m in requests if p + m <= num_blocks * BLOCK_SIZE]
    seqs, pending = [], list(enumerate(requests))
    for _ in range(2000):
        while pending and rng.random() < 0.5:  # requests keep arriving while others run
            i, (prompt_len, max_tokens) = pending.pop(0)
            seqs.append(add(scheduler, i, prompt_len, max_tokens))
        if not scheduler.has_work and not pending:
            break
        run_step(scheduler)
        snap = blocks(scheduler)
        assert snap.device.num_used == len({b for t in snap.tables.values() for b in t})
        assert len(scheduler.running) <= 4
    assert all(s.is_finished for s in seqs) and not pending
    assert [s.num_output_tokens for s in seqs] == [m for _, m in requests]
    assert blocks(scheduler).device.num_free == num_blocks


def test_samples_fork_after_the_prompt_but_its_last_token_and_copy_the_shared_block():
    scheduler = make_scheduler()
    first = add(scheduler, 0, 6, n=3, seed=1)  # 6 tokens: block 0 full, block 1 holds 2
    request = first.request
    step = scheduler.schedule()
    assert step.seqs == [first] and step.num_tokens == [5] and step.forks == []
    run_after(scheduler, step)
    step = scheduler.schedule()
    children = request.seqs[1:]
    assert step.forks == [(c.seq_id, first.seq_id, c.sample_index) for c in children]
    assert [c.sample_index for c in children] == [1, 2]
    # Each computes the last prompt token; two of the three copy the shared partial block.
    assert step.seqs == request.seqs and step.num_tokens == [1, 1, 1]
    assert len(step.copies) == 2 and len(step.replace_last) == 2
    tables = blocks(scheduler).tables
    assert len({tables[s.seq_id][0] for s in request.seqs}) == 1  # the full block is shared
    assert len({tables[s.seq_id][1] for s in request.seqs}) == 3


def run_after(scheduler, step):
    scheduler.update(step)
    for seq in step.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7, 0.0)
            if seq.num_output_tokens >= seq.request.params.max_tokens:
                scheduler.finish(seq, "length")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 10), st.integers(1, 3)),
                min_size=1, max_size=12),
       st.integers(12, 40), st.sampled_from([0, 8, 64]),
       st.sampled_from(["swap", "recompute", "auto"]), st.integers(0, 2**16))
def test_groups_move_whole_and_every_sample_completes(requests, num_blocks, num_cpu_blocks,
                                                      mode, seed):
    rng = random.Random(seed)
    scheduler = attached(BlockManager(BLOCK_SIZE, num_blocks, num_cpu_blocks, 0.0), 8, 64, mode)
    firsts, pending = [], list(enumerate(requests))
    for _ in range(3000):
        while pending and rng.random() < 0.5:
            i, (prompt_len, max_tokens, n) = pending.pop(0)
            firsts.append(add(scheduler, i, prompt_len, max_tokens, n=n, seed=i))
        if not scheduler.has_work and not pending:
            break
        run_step(scheduler)
        snap = blocks(scheduler)
        for pool, swapped in ((snap.device, False), (snap.cpu, True)):
            held = Counter(b for sid, t in snap.tables.items() if (sid in snap.swapped) == swapped
                           for b in t)
            assert all(pool.refcounts[b] == k for b, k in held.items())
            assert pool.num_used == len(held)
        running = {id(s.request) for s in scheduler.running}
        swapped = {id(s.request) for group in scheduler.swapped for s in group}
        assert not running & swapped  # a group is on the device or in CPU memory, whole
    assert not pending and not scheduler.has_work
    for first in firsts:
        seqs = first.request.seqs
        assert len(seqs) == first.request.params.n and all(s.is_finished for s in seqs)
        # A group that alone outgrows the pool ends early ("length"), like max_model_len.
        assert all(s.num_output_tokens == s.request.params.max_tokens
                   or first.request in scheduler.capped for s in seqs)
    snap = blocks(scheduler)
    assert snap.device.num_free == num_blocks and snap.cpu.num_free == num_cpu_blocks


def test_a_group_that_outgrows_the_pool_alone_ends_with_length_instead_of_looping():
    scheduler = make_scheduler(num_blocks=6)  # 24 slots; 3 samples of 4 + 20 tokens need 18
    first = add(scheduler, 0, 4, max_tokens=20, n=3, seed=0)
    for _ in range(50):
        if not scheduler.has_work:
            break
        run_step(scheduler)
    seqs = first.request.seqs
    assert scheduler.capped == [first.request] and not scheduler.has_work
    assert all(s.finish_reason == "length" and 0 < s.num_output_tokens < 20 for s in seqs)
    assert blocks(scheduler).device.num_free == 6


def test_detach_requeues_every_held_sequence_and_admin_still_describes_them():
    """After the executor is lost: running and swapped sequences wait again, computed from
    scratch, oldest first, and ``pagedserve seq`` shows them without an executor session."""
    import json

    from pagedserve.scheduler_svc.admin import AdminHandler

    scheduler = attached(BlockManager(4, 8, 8), max_num_seqs=8, max_num_batched_tokens=64,
                         preemption_mode="swap")
    requests = [Request(str(i), b"c", SamplingParams(max_tokens=50, ignore_eos=True),
                        list(range(3, 13)), stream=False) for i in range(4)]
    for request in requests:
        scheduler.add(request)
    for _ in range(6):  # prefill, then decodes until blocks run out and a group is swapped
        step = scheduler.schedule()
        scheduler.update(step)
        for seq in step.seqs:
            if seq.num_pending_tokens == 0:
                seq.append_token(7, 0.0)
    late = Request("late", b"c", SamplingParams(), [5, 6], stream=False)
    scheduler.add(late)  # never ran: stays behind the ones that did
    assert scheduler.running and scheduler.swapped and len(scheduler.waiting) == 1
    assert len(scheduler.detach()) == 4
    assert scheduler.session is None and not scheduler.running and not scheduler.swapped
    assert [s.request.request_id for s in scheduler.waiting] == ["0", "1", "2", "3", "late"]
    assert all(s.num_computed_tokens == 0 and s.status == SequenceStatus.WAITING
               for s in scheduler.waiting)
    handler = AdminHandler(scheduler, metrics=None, service_health=None, block_size=4)
    seq_id = scheduler.waiting[0].seq_id
    reply = json.loads(handler.handle(json.dumps({"cmd": "seq", "seq_id": seq_id}).encode()))
    assert reply["blocks"] == [] and reply["pool"] is None


def tuples(flat, k=2):
    return [tuple(flat[i:i + k]) for i in range(0, len(flat), k)]


class SimExecutor:
    """The executor's side of the plans, without a model: it mirrors each sequence's tokens
    and table as the real one does, writes each computed token's id into the cache slot the
    table gives it, and checks that every sequence it computes reads its whole context back
    from its own table. A block reused too early, a lost copy-on-write or swap, or a prefix
    hit on the wrong tokens reads back someone else's token. Plans run in the order sent."""

    def __init__(self, rng: random.Random, stop: int):
        self.rng, self.stop = rng, stop
        self.seqs: dict[int, list] = {}  # seq id -> [tokens, table, num_computed]
        self.device: dict[int, dict[int, int]] = {}  # block -> slot -> token id
        self.cpu: dict[int, dict[int, int]] = {}

    def execute(self, plan) -> dict[int, int]:
        for seq_id in plan.removed.tolist():
            self.seqs.pop(seq_id, None)
        for new in plan.new_seqs:
            self.seqs[new.seq_id] = [new.token_ids.tolist(), new.block_table.tolist(),
                                     new.num_computed_tokens]
        for child, parent, _ in tuples(plan.forks.tolist(), 3):
            tokens, table, computed = self.seqs[parent]
            self.seqs[child] = [list(tokens), list(table), computed]
        for src, dst in tuples(plan.swap_out.tolist()):
            self.cpu[dst] = dict(self.device.get(src, {}))
        for src, dst in tuples(plan.swap_in.tolist()):
            self.device[dst] = dict(self.cpu.get(src, {}))
        for src, dst in tuples(plan.copies.tolist()):
            self.device[dst] = dict(self.device.get(src, {}))
        for seq_id, block in tuples(plan.replace_last.tolist()):
            self.seqs[seq_id][1][-1] = block
        for seq_id, block in tuples(plan.block_appends.tolist()):
            self.seqs[seq_id][1].append(block)
        sampled = {}
        for seq_id, n in zip(plan.seq_ids.tolist(), plan.num_tokens.tolist()):
            state = self.seqs[seq_id]
            tokens, table, computed = state
            assert computed + n <= min(len(tokens), len(table) * BLOCK_SIZE)
            for pos in range(computed, computed + n):
                self.device.setdefault(table[pos // BLOCK_SIZE], {})[pos % BLOCK_SIZE] = \
                    tokens[pos]
            state[2] = computed = computed + n
            read = [self.device.get(table[pos // BLOCK_SIZE], {}).get(pos % BLOCK_SIZE)
                    for pos in range(computed)]
            assert read == tokens[:computed], f"seq {seq_id} reads a context not its own"
            if computed == len(tokens):
                sampled[seq_id] = self.rng.randrange(self.stop, self.stop + 8)
                tokens.append(sampled[seq_id])
        return sampled


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 10), st.integers(1, 3)),
                min_size=1, max_size=10),
       st.integers(12, 40), st.sampled_from([0, 64]), st.sampled_from(["swap", "recompute"]),
       st.booleans(), st.integers(0, 2**16))
def test_every_sequence_reads_its_own_tokens_with_and_without_async_scheduling(
        requests, num_blocks, num_cpu_blocks, mode, pipelined, seed):
    """Through a simulated executor, with prefix sharing, samples, preemption, stop tokens
    and aborts: every context reads back exactly its own tokens, every request ends, and
    the pools end empty; with ``pipelined``, steps go ahead as the service sends them."""
    from pagedserve.common import protocol as p

    rng, stop = random.Random(seed), 100  # a sampled 100 is a stop token: one in eight
    scheduler = attached(BlockManager(BLOCK_SIZE, num_blocks, num_cpu_blocks, 0.0), 8, 64, mode)
    executor = SimExecutor(random.Random(seed + 1), stop)
    requests = [(pl, m, n) for pl, m, n in requests if pl + m <= num_blocks * BLOCK_SIZE // 2]
    firsts, pending, in_flight, step_no, ahead = [], list(enumerate(requests)), [], 0, 0

    def send(step):
        nonlocal step_no
        step_no += 1
        plan = p.decode(p.encode(step.to_plan(step_no)))
        in_flight.append((step, executor.execute(plan)))

    for _ in range(3000):
        while pending and rng.random() < 0.3:
            i, (prompt_len, max_tokens, n) = pending.pop(0)
            firsts.append(add(scheduler, i, prompt_len, max_tokens, n=n, seed=i))
        if not in_flight:
            if not scheduler.has_work and not pending:
                break
            step = scheduler.schedule()
            if step.is_empty and not step.removed:
                continue
            send(step)
        if pipelined and len(in_flight) == 1:
            step = scheduler.schedule_ahead(
                in_flight[0][0], lambda s: s.num_output_tokens + 1 >= s.request.params.max_tokens)
            if step is not None:
                send(step)
                ahead += 1
        if scheduler.running and rng.random() < 0.05:  # an abort, maybe with two in flight
            for seq in rng.choice(scheduler.running).request.seqs:  # as Engine.abort: all
                scheduler.finish(seq, "abort")                     # samples, forked or not
        step, sampled = in_flight.pop(0)
        scheduler.update(step)
        for seq in step.seqs:
            if seq.seq_id in sampled and not seq.is_finished:
                seq.append_token(sampled[seq.seq_id], 0.0)
                if (sampled[seq.seq_id] == stop
                        or seq.num_output_tokens >= seq.request.params.max_tokens):
                    scheduler.finish(seq, "stop")
    assert not pending and not scheduler.has_work and not in_flight
    assert all(s.is_finished for first in firsts for s in first.request.seqs)
    snap = blocks(scheduler)
    assert snap.device.num_free == num_blocks and snap.cpu.num_free == num_cpu_blocks
    assert pipelined or ahead == 0
