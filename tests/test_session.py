"""Executor sessions: built whole from the handshake, attached to the scheduler, detached on
loss; the counters the metrics scrape stay with the scheduler and never go backwards."""
import pytest

from pagedserve.common import protocol as p
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request, SequenceStatus
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession

BLOCK_SIZE = 4
MODEL_LIMIT = ContextLimit(8192, "the model serves no more")


def register(max_model_len=8192) -> p.RegisterExecutor:
    return p.RegisterExecutor(model="m", architecture="LlamaForCausalLM", vocab_size=100,
                              max_model_len=max_model_len, dtype="float32", device="cpu",
                              kv_bytes_per_token=64)


def open_session(num_device_blocks=16, num_cpu_blocks=8, prefix_caching=True):
    config = SchedulerConfig(block_size=BLOCK_SIZE, watermark=0.0,
                             enable_prefix_caching=prefix_caching)
    return ExecutorSession.open(config, register(), p.ExecutorReady(num_device_blocks,
                                                                     num_cpu_blocks),
                                MODEL_LIMIT)


def run(scheduler, prompt, max_tokens=2):
    """Queue a greedy request and step it to the end (every step acknowledged at once)."""
    request = Request(str(id(prompt)), b"c", SamplingParams(max_tokens=max_tokens), prompt,
                      stream=False)
    scheduler.add(request)
    while not request.is_finished:
        step = scheduler.schedule()
        scheduler.update(step)
        for seq in step.seqs:
            if seq.num_pending_tokens == 0:
                seq.append_token(7, 0.0)
                if seq.num_output_tokens == max_tokens:
                    scheduler.finish(seq, "length")
    scheduler.schedule()  # releases its blocks
    return request


def test_a_session_is_sized_by_the_handshake_and_serves_no_more_than_its_pool_holds():
    session = open_session(num_device_blocks=16)
    assert session.max_model_len == 16 * BLOCK_SIZE
    assert session.limit.why == "the KV pool holds no more"
    assert session.block_manager.snapshot().cpu.num_blocks == 8
    assert session.cost_model is not None
    roomy = open_session(num_device_blocks=4096)
    assert roomy.limit == MODEL_LIMIT  # the pool holds more than the model serves


def test_a_lower_limit_replaces_a_higher_one_and_never_the_reverse():
    limit = MODEL_LIMIT.lower(512, "the executor's model serves no more")
    assert limit == ContextLimit(512, "the executor's model serves no more")
    assert limit.lower(1024, "the KV pool holds no more") is limit


def test_a_scheduler_is_ready_only_while_a_session_is_attached():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    assert not scheduler.ready and scheduler.kv_cache_usage == 0.0
    session = open_session()
    scheduler.attach(session)
    assert scheduler.ready and scheduler.session is session
    with pytest.raises(AssertionError, match="detach it first"):
        scheduler.attach(open_session())
    assert scheduler.detach() == [] and not scheduler.ready


def test_detach_returns_the_held_sequences_to_recompute_and_a_new_session_finishes_them():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.attach(open_session())
    request = Request("r", b"c", SamplingParams(max_tokens=3, n=2), list(range(9)),
                      stream=False)
    scheduler.add(request)
    for _ in range(3):
        scheduler.update(scheduler.schedule())
    assert len(scheduler.running) == 2 and scheduler.kv_cache_usage > 0
    requeued = scheduler.detach()
    assert requeued == request.seqs and list(scheduler.waiting) == requeued
    assert all(s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0
               for s in requeued)
    session = open_session()
    scheduler.attach(session)
    step = scheduler.schedule()
    assert step.new_seqs == requeued and step.removed == []  # the new executor knows none
    assert [len(table) for table in step.new_tables] == [3, 3]



def test_each_executor_loss_counts_once_for_each_request_it_held_and_never_for_a_waiting_one():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.attach(open_session(num_device_blocks=4))
    held = Request("held", b"c", SamplingParams(max_tokens=3, n=2), list(range(9)),
                   stream=False)
    queued = Request("queued", b"c", SamplingParams(max_tokens=3), list(range(20, 33)),
                     stream=False)
    scheduler.add(held)
    scheduler.add(queued)
    for _ in range(2):
        scheduler.update(scheduler.schedule())
    assert len(scheduler.running) == 2 and list(scheduler.waiting) == queued.seqs
    for losses in (1, 2):
        scheduler.detach()
        assert (held.num_executor_losses, queued.num_executor_losses) == (losses, 0)
        scheduler.attach(open_session(num_device_blocks=4))
        scheduler.update(scheduler.schedule())

def test_prefix_cache_counters_count_prompt_tokens_looked_up_and_found_cached():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.attach(open_session())
    prefix = list(range(3 * BLOCK_SIZE))
    run(scheduler, prefix + [50, 51])
    run(scheduler, prefix + [60, 61, 62])
    assert scheduler.prefix_cache_stats == {"queries": 14 + 15, "hits": 12}


def test_prefix_cache_counters_stay_zero_with_prefix_caching_off():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.attach(open_session(prefix_caching=False))
    for _ in range(2):
        run(scheduler, list(range(3 * BLOCK_SIZE)))
    assert scheduler.prefix_cache_stats == {"queries": 0, "hits": 0}


def test_prefix_cache_counters_survive_an_executor_loss_and_a_new_session():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.attach(open_session())
    prompt = list(range(2 * BLOCK_SIZE + 1))
    run(scheduler, prompt)
    run(scheduler, prompt)
    before = dict(scheduler.prefix_cache_stats)
    assert before == {"queries": 18, "hits": 8}
    scheduler.detach()
    assert scheduler.prefix_cache_stats == before
    scheduler.attach(open_session())  # a new executor: an empty prefix cache
    run(scheduler, prompt)
    assert scheduler.prefix_cache_stats == {"queries": 27, "hits": 8}
    assert scheduler.preemptions == {"swap": 0, "recompute": 0}

