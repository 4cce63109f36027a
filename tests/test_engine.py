"""Scheduler, wire protocol and model runner together in one process, on tiny random models:
greedy output equals transformers' own, with and without recompute preemption."""
import random
from collections import deque

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.common import protocol as p
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.model import ModelConfig, load_model
from pagedserve.executor_svc.model_runner import ModelRunner, PlanError
from pagedserve.executor_svc.step_pipeline import StepPipeline
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.output_processor import DeltaTracker, OutputProcessor
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession
from tiny_models import make_tiny_model, transformers_greedy, word_tokenizer

BLOCK_SIZE = 4
PROMPT_LENS = [5, 17, 30, 9, 1]
MAX_TOKENS = 12
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]
    return path, prompts, transformers_greedy(path, prompts, MAX_TOKENS)


def make_runner(path, num_blocks, num_cpu_blocks=0, attention_backend="torch", device="cpu"):
    config = ModelConfig.from_model_dir(path)
    model = load_model(path, torch.float32, torch.device(device))
    cache = CacheEngine(config, BLOCK_SIZE, num_blocks, num_cpu_blocks, torch.float32, device)
    return ModelRunner(model, cache, BLOCK_SIZE, attention_backend)


def make_engine(bm, max_num_seqs, max_batched, mode, eos_token_ids=()):
    """An engine whose scheduler has an executor session over ``bm``."""
    scheduler = Scheduler(max_num_seqs, max_batched, mode)
    scheduler.attach(session(bm))
    return Engine(scheduler, OutputProcessor(word_tokenizer(eos_token_ids),
                                             lambda: MAX_MODEL_LEN))


def session(bm):
    return ExecutorSession(bm, ContextLimit(MAX_MODEL_LEN, "the test serves no more"))


def drive(engine, runner, pipelined=False, on_step=None, overlaps=False):
    """Run the engine's steps on ``runner`` through encoded plans and results until nothing
    is left; returns how many steps were sent ahead, and how many launched ahead.
    ``pipelined``: as the service does with async scheduling, the step after the one in
    flight is built before its result is processed (the runner, like the executor, runs
    plans in the order they are sent).
    ``overlaps``: as the executor does on a GPU (``StepPipeline``), that step is also launched
    before the one in flight finishes, its input the token left on the device."""
    steps = StepPipeline(runner, overlaps)
    in_flight, results, ahead = deque(), deque(), 0

    def send(scheduled):
        step, plan = scheduled
        in_flight.append(step)
        steps.submit(p.decode(p.encode(plan)))
        results.extend(steps.take())

    while True:
        if not in_flight:
            scheduled = engine.schedule()
            if scheduled is None:
                return ahead, steps.launched_ahead
            send(scheduled)
        if pipelined and len(in_flight) == 1:
            scheduled = engine.schedule_ahead(in_flight[0])
            if scheduled is not None:
                send(scheduled)
                ahead += 1
        if not results:
            steps.flush()
            results.extend(steps.take())
        engine.process(in_flight.popleft(), p.decode(p.encode(results.popleft())))
        if not in_flight and steps.in_flight is None:
            assert_mirror_holds_the_tokens(engine.scheduler, getattr(runner, "runner", runner))
        if on_step is not None:
            on_step(engine.scheduler)


def assert_mirror_holds_the_tokens(scheduler, runner):
    """With no step in flight, the executor's mirror of each sequence the scheduler holds
    has its tokens (placeholders of tokens sampled ahead all taken), and past a stop token
    at most the one computed in vain; a beam's wait for the scheduler's choice."""
    for seq in scheduler.running:
        if seq.seq_id in runner.seqs and seq.request.beam is None:
            mirrored = runner.seqs[seq.seq_id].token_ids
            assert mirrored[:seq.num_tokens] == seq.token_ids, seq.seq_id
            assert len(mirrored) - seq.num_tokens <= (seq.finish_reason == "stop")


def run(path, requests, num_blocks=64, max_batched=256, mode="recompute", num_cpu_blocks=0,
        prefix_caching=True, eos_token_ids=(), on_step=None, attention_backend="torch",
        device="cpu", runner=None, pipelined=False, overlaps=False):
    """Run requests through engine -> encoded plan -> runner -> encoded result, in process
    (``runner``, or a new one; ``drive``'s ``pipelined`` and ``overlaps``). Returns the
    scheduler (its preemption counters)."""
    runner = runner or make_runner(path, num_blocks, num_cpu_blocks, attention_backend, device)
    bm = BlockManager(BLOCK_SIZE, num_blocks, num_cpu_blocks, 0.0, prefix_caching)
    engine = make_engine(bm, 8, max_batched, mode, eos_token_ids)
    for request in requests:
        engine.add(request)
    ahead, launched_ahead = drive(engine, runner, pipelined, on_step, overlaps)
    assert (ahead > 0) == pipelined
    # penalties count the tokens on the host: never launched ahead of the step sampling them
    penalised = any(r.params.repetition_penalty != 1.0 or r.params.frequency_penalty
                    or r.params.presence_penalty for r in requests)
    assert (launched_ahead > 0) == (overlaps and not penalised)
    assert not engine.scheduler.has_work and all(r.is_finished for r in requests)
    snap = bm.snapshot()
    assert snap.device.num_free == num_blocks and snap.cpu.num_free == num_cpu_blocks
    return engine.scheduler


def request(ids, max_tokens=MAX_TOKENS, **params):
    return Request(str(len(ids)), b"c", SamplingParams(max_tokens=max_tokens, **params), ids,
                   stream=False)


def generate(path, prompts, num_blocks, **kwargs):
    """Every prompt greedy to MAX_TOKENS: the outputs and the preemption counters."""
    requests = [request(ids, temperature=0.0, ignore_eos=True) for ids in prompts]
    scheduler = run(path, requests, num_blocks, **kwargs)
    return [r.seqs[0].output_token_ids for r in requests], scheduler.preemptions


# Step by step; the next step sent ahead of the one in flight; and launched ahead of it too.
PIPELINES = [dict(pipelined=False), dict(pipelined=True),
             dict(pipelined=True, overlaps=True)]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=["by step", "ahead", "overlapped"])
def test_batched_greedy_equals_transformers(tiny, pipeline):
    path, prompts, expected = tiny
    outputs, preemptions = generate(path, prompts, num_blocks=64, **pipeline)
    assert preemptions == {"swap": 0, "recompute": 0}
    assert outputs == expected


@pytest.mark.parametrize("pipeline", PIPELINES, ids=["by step", "ahead", "overlapped"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_sequences_continue_exactly(tiny, mode, pipeline):
    path, prompts, expected = tiny
    # 48 device slots for 5 sequences of up to 42 tokens: preemption must happen
    outputs, preemptions = generate(path, prompts, num_blocks=12, mode=mode, num_cpu_blocks=64,
                                    **pipeline)
    assert preemptions[mode] > 0 and sum(preemptions.values()) == preemptions[mode]
    assert outputs == expected


def test_shared_prefix_is_computed_once_and_gives_the_same_tokens(tiny):
    path, prompts, _ = tiny
    shared = prompts[2][:24]  # six full blocks
    with_prefix = [shared + [5, 6, 7], shared + [8, 9]]
    cached, _ = generate(path, with_prefix[:1] + with_prefix, num_blocks=64, max_batched=32)
    plain, _ = generate(path, with_prefix[:1] + with_prefix, num_blocks=64, max_batched=32,
                        prefix_caching=False)
    assert cached == plain


@pytest.mark.parametrize("pipelined", [False, True])
def test_chunked_prefill_mixed_with_decodes_gives_the_same_tokens(tiny, pipelined):
    path, prompts, expected = tiny
    # a 30-token prompt: 4+ chunks
    outputs, _ = generate(path, prompts, num_blocks=64, max_batched=8, pipelined=pipelined)
    assert outputs == expected


@pytest.mark.parametrize("lose_at", [2, 9, 14])
def test_after_a_lost_executor_every_sequence_continues_exactly_on_a_new_one(tiny, lose_at):
    """The executor dies with a step in flight (its result never comes) while sequences are
    running, swapped, forked and waiting: ``detach`` queues them again, and a fresh
    executor and session finish every request with the undisturbed tokens."""
    path, prompts, expected = tiny
    requests = [request(ids, n=2, temperature=0.0, ignore_eos=True) for ids in prompts]
    engine = make_engine(BlockManager(BLOCK_SIZE, 20, 64), 8, 16, "swap")
    for r in requests:
        engine.add(r)
    runner, states, swapped_at_loss = make_runner(path, 20, 64), set(), 0
    for step_no in range(1, 1000):
        scheduled = engine.schedule()
        if scheduled is None:
            break
        step, plan = scheduled
        states |= {s.status.value for r in requests for s in r.seqs}
        if step_no == lose_at:  # this plan is lost with the executor
            swapped_at_loss = len(engine.scheduler.swapped)
            assert engine.scheduler.detach()
            assert all(s.num_computed_tokens == 0 for s in engine.scheduler.waiting)
            engine.scheduler.attach(session(BlockManager(BLOCK_SIZE, 20, 64)))
            runner = make_runner(path, 20, 64)
            continue
        engine.process(step, runner.execute(p.decode(p.encode(plan))))
    assert {"running", "waiting"} <= states
    assert (swapped_at_loss > 0) == (lose_at > 2)  # groups swapped to the lost CPU memory
    assert [[s.output_token_ids for s in r.seqs] for r in requests] == [[e] * 2 for e in expected]
    assert engine.scheduler.session.block_manager.snapshot().device.num_free == 20


def test_invalid_plans_are_rejected_without_changing_state(tiny):
    path, prompts, _ = tiny
    runner = make_runner(path, 8)
    good = p.NewSeq(seq_id=1, token_ids=prompts[0], block_table=[0, 1], params={})
    cases = {
        "unknown seq id": p.StepPlan(step=1, removed=[], new_seqs=[], seq_ids=[5],
                                      num_tokens=[1], block_appends=[]),
        "outside the device pool": p.StepPlan(step=1, removed=[], seq_ids=[1], num_tokens=[5],
                                              block_appends=[], new_seqs=[p.NewSeq(
                                                  seq_id=1, token_ids=prompts[0],
                                                  block_table=[0, 99], params={})]),
        "exceed": p.StepPlan(step=1, removed=[], new_seqs=[good], seq_ids=[1], num_tokens=[9],
                             block_appends=[]),
    }
    for expected, plan in cases.items():
        with pytest.raises(PlanError, match=expected):
            runner.execute(p.decode(p.encode(plan)))
        assert runner.seqs == {}


# ---------------------------------------------------------------- parallel sampling

def cpu_blocks(mode):
    """Groups of several sequences swap whenever the CPU pool has room: no room forces
    recompute."""
    return 128 if mode == "swap" else 0


@pytest.mark.parametrize("mode, num_blocks", [("recompute", 64), ("swap", 20), ("recompute", 20)])
def test_greedy_samples_forked_from_one_prefill_all_equal_the_greedy_output(tiny, mode,
                                                                            num_blocks):
    path, prompts, expected = tiny
    requests = [request(ids, n=3, temperature=0.0, ignore_eos=True) for ids in prompts]
    scheduler = run(path, requests, num_blocks, mode=mode, num_cpu_blocks=cpu_blocks(mode))
    assert [[s.output_token_ids for s in r.seqs] for r in requests] == [[e] * 3 for e in expected]
    if num_blocks < 64:
        assert scheduler.preemptions[mode] > 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_seeded_samples_are_reproducible_and_exact_under_preemption(tiny, mode):
    path, prompts, _ = tiny

    def samples(num_blocks, pipelined=False):
        requests = [request(ids, n=3, seed=11, ignore_eos=True) for ids in prompts]
        scheduler = run(path, requests, num_blocks, mode=mode, num_cpu_blocks=cpu_blocks(mode),
                        pipelined=pipelined)
        return [[s.output_token_ids for s in r.seqs] for r in requests], scheduler.preemptions

    alone, _ = samples(64)
    assert samples(64, pipelined=True)[0] == alone
    constrained, preemptions = samples(20, pipelined=True)
    assert preemptions[mode] > 0 and constrained == alone
    assert all(len({tuple(s) for s in group}) > 1 for group in alone)  # the samples differ


@pytest.mark.parametrize("overlaps", [False, True])
def test_penalised_greedy_equals_transformers_under_recompute(tiny, overlaps):
    """Penalties count a sequence's tokens on the host: with overlapping steps, the step in
    flight finishes before the next one is launched."""
    path, prompts, plain = tiny
    expected = transformers_greedy(path, prompts, MAX_TOKENS, repetition_penalty=1.5)
    requests = [request(ids, temperature=0.0, ignore_eos=True, repetition_penalty=1.5)
                for ids in prompts]
    runner = make_runner(path, 12)
    scheduler = run(path, requests, 12, mode="recompute", runner=runner, pipelined=overlaps,
                    overlaps=overlaps)
    assert scheduler.preemptions["recompute"] > 0
    assert [r.seqs[0].output_token_ids for r in requests] == expected != plain


def test_samples_penalised_over_their_own_output_continue_exactly_when_swapped(tiny):
    path, prompts, _ = tiny

    def samples(num_blocks, **penalties):
        # cool enough to repeat tokens, as greedy does
        requests = [request(ids, n=3, seed=5, temperature=0.2, ignore_eos=True, **penalties)
                    for ids in prompts]
        scheduler = run(path, requests, num_blocks, mode="swap", num_cpu_blocks=128)
        return [[s.output_token_ids for s in r.seqs] for r in requests], scheduler.preemptions

    alone, _ = samples(64, presence_penalty=2.0, frequency_penalty=2.0)
    constrained, preemptions = samples(20, presence_penalty=2.0, frequency_penalty=2.0)
    assert preemptions["swap"] > 0 and constrained == alone
    assert alone != samples(64)[0]  # the penalties changed the draws


@pytest.mark.parametrize("num_blocks", [64, 20])
def test_prompt_logprobs_equal_transformers_across_chunks_and_recompute(tiny, num_blocks):
    path, prompts, _ = tiny
    requests = [request(ids, n=2, temperature=0.0, prompt_logprobs=3) for ids in prompts]
    scheduler = run(path, requests, num_blocks, max_batched=8, mode="recompute")  # chunked
    assert (scheduler.preemptions["recompute"] > 0) == (num_blocks == 20)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for r, ids in zip(requests, prompts):
        with torch.inference_mode():
            expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1)
        assert len(r.prompt_logprobs) == len(ids) - 1
        for token, entry, row in zip(ids[1:], r.prompt_logprobs, expected):
            assert next(iter(entry)) == token and 3 <= len(entry) <= 4
            for t, (logprob, rank) in entry.items():
                assert logprob == pytest.approx(row[t].item(), abs=1e-4)
                # ranks as transformers' logits give them, up to float rounding
                assert (row > logprob + 1e-4).sum() < rank <= (row >= logprob - 1e-4).sum()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_cuda_swapped_and_forked_samples_give_the_transformers_tokens(tiny, backend):
    """On a GPU: groups swap out to pinned host memory and back, and forked samples copy their
    shared last block on write; the greedy samples still equal transformers' output."""
    path, prompts, expected = tiny
    requests = [request(ids, n=3, temperature=0.0, ignore_eos=True) for ids in prompts]
    scheduler = run(path, requests, 20, mode="swap", num_cpu_blocks=cpu_blocks("swap"),
                    attention_backend=backend, device="cuda")
    assert scheduler.preemptions["swap"] > 0
    assert [[s.output_token_ids for s in r.seqs] for r in requests] == [[e] * 3 for e in expected]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
def test_on_cuda_steps_launched_ahead_give_the_transformers_tokens(tiny, graphs):
    """On a GPU, each step launched before the one in flight is read back (its input the
    token that one left on the device, copied back to pinned memory behind an event), eagerly
    and from decode graphs: transformers' tokens."""
    path, prompts, expected = tiny
    runner = make_runner(path, 64, attention_backend="triton", device="cuda")
    if graphs:
        runner.use_decode_graphs(8, MAX_MODEL_LEN)
    outputs, _ = generate(path, prompts, 64, runner=runner, pipelined=True, overlaps=True)
    assert outputs == expected
    assert (runner.graphs is not None and runner.graphs.steps > 0) == graphs


def test_n_samples_hold_fewer_blocks_than_n_separate_requests(tiny):
    path, prompts, _ = tiny
    prompt = prompts[2]  # 30 tokens: 7 full blocks and a partial one

    def peak_blocks(requests):
        peak = []
        run(path, requests, prefix_caching=False,
            on_step=lambda s: peak.append(s.session.block_manager.snapshot().device.num_used))
        return max(peak)

    grouped = peak_blocks([request(prompt, n=4, seed=3, ignore_eos=True)])
    separate = peak_blocks([request(prompt, seed=3 + i, ignore_eos=True) for i in range(4)])
    # 42 tokens at the end: 11 blocks each; the group shares the prompt's 7 full blocks.
    assert (grouped, separate) == (7 + 4 * 4, 4 * 11)


def test_best_of_returns_the_n_samples_of_highest_cumulative_logprob(tiny):
    path, prompts, _ = tiny
    req = request(prompts[1], n=2, best_of=4, seed=5, ignore_eos=True)
    run(path, [req])
    outputs = DeltaTracker(req, word_tokenizer()).deltas()
    ranked = sorted(req.seqs, key=lambda s: s.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in outputs] == [s.output_token_ids for s in ranked[:2]]
    assert [o.index for o in outputs] == [0, 1]


# ---------------------------------------------------------------- async scheduling

class CountingRunner:
    """A model runner that counts the tokens the plans compute for each sequence."""

    def __init__(self, runner):
        self.runner, self.computed = runner, {}
        self.finish, self.can_launch_ahead = runner.finish, runner.can_launch_ahead

    def launch(self, plan):
        for seq_id, num_tokens in zip(plan.seq_ids.tolist(), plan.num_tokens.tolist()):
            self.computed[seq_id] = self.computed.get(seq_id, 0) + num_tokens
        return self.runner.launch(plan)


def finished(requests):
    return [[(seq.output_token_ids, seq.finish_reason) for seq in r.seqs] for r in requests]


def test_async_scheduling_stops_and_caches_exactly_as_step_by_step(tiny):
    """Sequences that stop on a token (seen only in the result, after the step behind it was
    sent: it computes one token in vain), at their max_tokens (never sent ahead), and seeded
    samples end exactly as step by step, and free every block. A second wave whose prompts
    are the first wave's whole sequences then hits the blocks the first wave cached, and
    computes the tokens a run without the prefix cache computes."""
    path, prompts, expected = tiny
    eos = expected[2][4]  # request 2 is greedy: it stops there

    def first_wave():
        return [request(ids, max_tokens=MAX_TOKENS - i, **({"n": 2, "seed": i} if i % 2 else
                                                          {"temperature": 0.0}))
                for i, ids in enumerate(prompts)]

    def waves(pipelined, prefix_caching=True, overlaps=False):
        runner = CountingRunner(make_runner(path, 64))
        bm = BlockManager(BLOCK_SIZE, 64, 0, 0.0, prefix_caching)
        engine = make_engine(bm, 8, 256, "recompute", [eos])
        first = first_wave()
        second = []
        for wave in (first, second):
            for r in wave:
                engine.add(r)
            ahead, launched_ahead = drive(engine, runner, pipelined, overlaps=overlaps)
            assert (ahead > 0) == pipelined and (launched_ahead > 0) == overlaps
            assert bm.snapshot().device.num_free == 64
            assert all(r.is_finished for r in wave)
            second += [request(seq.token_ids, max_tokens=6, temperature=0.0, ignore_eos=True)
                       for r in first for seq in r.seqs]
            # Never past the last sampled token; one in vain after a stop token at most.
            assert all(runner.computed[seq.seq_id] <= seq.num_tokens - (seq.finish_reason != "stop")
                       for r in wave for seq in r.seqs)
        return finished(first), finished(second), engine.scheduler.prefix_cache_stats["hits"]

    step_by_step = waves(pipelined=False)
    reasons = {reason for groups in step_by_step[0] for _, reason in groups}
    assert reasons == {"stop", "length"}
    first, second, hits = waves(pipelined=True)
    assert (first, second) == step_by_step[:2]
    assert hits > 0 and waves(pipelined=True, prefix_caching=False)[1] == second
    # launched ahead too: the token in flight taken on the device, seeded draws and all
    assert waves(pipelined=True, overlaps=True)[:2] == step_by_step[:2]


def test_async_scheduling_survives_aborts_with_two_steps_in_flight(tiny):
    """Requests aborted while two steps are in flight free their blocks (the executor drops
    them with the next plan); the others finish with transformers' tokens."""
    path, prompts, expected = tiny
    runner = make_runner(path, 64)
    bm = BlockManager(BLOCK_SIZE, 64, 0, 0.0, True)
    engine = make_engine(bm, 8, 256, "recompute")
    requests = [request(ids, temperature=0.0, ignore_eos=True) for ids in prompts]
    for r in requests:
        engine.add(r)
    in_flight, aborted = deque(), []
    while True:
        if not in_flight:
            scheduled = engine.schedule()
            if scheduled is None:
                break
            in_flight.append(scheduled[0])
            result_of = {scheduled[1].step: runner.execute(p.decode(p.encode(scheduled[1])))}
        if len(in_flight) == 1 and (ahead := engine.schedule_ahead(in_flight[0])) is not None:
            in_flight.append(ahead[0])
            result_of[ahead[1].step] = runner.execute(p.decode(p.encode(ahead[1])))
            live = [r for r in requests if not r.is_finished and r not in aborted]
            if len(in_flight) == 2 and len(aborted) < 2 and live:
                aborted.append(live[-1])
                engine.abort(live[-1])
        step = in_flight.popleft()
        engine.process(step, result_of.pop(min(result_of)))
    assert len(aborted) == 2 and bm.snapshot().device.num_free == 64
    kept = [i for i, r in enumerate(requests) if r not in aborted]
    assert [requests[i].seqs[0].output_token_ids for i in kept] == [expected[i] for i in kept]
    assert all(len(r.seqs[0].output_token_ids) < MAX_TOKENS for r in aborted)


# ---------------------------------------------------------------- beam search

def hf_beam_search(path, ids, eos, **kwargs):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS,
                          eos_token_id=eos, pad_token_id=eos, **kwargs)
    tokens = out[0, len(ids):].tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("width, length_penalty, early_stopping",
                         [(2, 1.0, False), (4, 1.0, True), (3, 0.0, False), (4, 2.0, False)])
def test_beam_search_finds_the_sequence_transformers_finds(tiny, width, length_penalty,
                                                           early_stopping):
    path, prompts, expected = tiny
    eos = expected[0][2]  # a token these prompts' beams meet, so some hypotheses end early
    settings = dict(length_penalty=length_penalty, early_stopping=early_stopping)
    requests = [request(ids, beam_width=width, **settings) for ids in prompts]
    run(path, requests, eos_token_ids=[eos])
    want = [hf_beam_search(path, ids, eos, num_beams=width, **settings) for ids in prompts]
    assert [r.beam.best(1)[0].token_ids for r in requests] == want
    if length_penalty == 0.0:  # scored by sum alone, a hypothesis that met EOS early wins
        assert any(r.beam.best(1)[0].finish_reason == "stop" for r in requests)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_beam_search_continues_exactly_under_preemption(tiny, mode):
    path, prompts, expected = tiny

    def best(num_blocks):
        requests = [request(ids, beam_width=3) for ids in prompts]
        scheduler = run(path, requests, num_blocks, mode=mode, num_cpu_blocks=cpu_blocks(mode),
                        eos_token_ids=[expected[0][2]])
        return [[h.token_ids for h in r.beam.best(3)] for r in requests], scheduler.preemptions

    alone, _ = best(128)
    constrained, preemptions = best(28)
    assert preemptions[mode] > 0 and constrained == alone
