"""Scheduler, wire protocol and model runner together in one process, on tiny random models:
greedy output equals transformers' own, with and without recompute preemption."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from common import protocol as p
from common.sampling import SamplingParams
from executor_svc.cache_engine import CacheEngine
from executor_svc.model import ModelConfig, load_model
from executor_svc.model_runner import ModelRunner, PlanError
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Request, Sequence
from tiny_models import make_tiny_model

BLOCK_SIZE = 4
PROMPT_LENS = [5, 17, 30, 9, 1]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    expected = []
    for ids in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              min_new_tokens=MAX_TOKENS)
        expected.append(out[0, len(ids):].tolist())
    return path, prompts, expected


def make_runner(path, num_blocks, num_cpu_blocks=0):
    config = ModelConfig.from_model_dir(path)
    model = load_model(path, torch.float32, torch.device("cpu"))
    cache = CacheEngine(config, BLOCK_SIZE, num_blocks, num_cpu_blocks, torch.float32, "cpu")
    return ModelRunner(model, cache, BLOCK_SIZE)


def generate(path, prompts, num_blocks, max_batched=256, mode="recompute", num_cpu_blocks=0,
             prefix_caching=True):
    """Run every prompt to MAX_TOKENS through scheduler -> encoded plan -> runner -> result."""
    runner = make_runner(path, num_blocks, num_cpu_blocks)
    bm = BlockManager(BLOCK_SIZE, num_blocks, num_cpu_blocks, 0.0, prefix_caching)
    scheduler = Scheduler(bm, 8, max_batched, mode)
    seqs = []
    for i, ids in enumerate(prompts):
        request = Request(str(i), b"c", SamplingParams(temperature=0.0), ids, stream=False)
        seqs.append(Sequence(i, ids, request))
        scheduler.add(seqs[-1])
    for step_no in range(1, 500):
        step = scheduler.schedule()
        if step.is_empty:
            break
        plan = p.decode(p.encode(step.to_plan(step_no, scheduler.block_manager.tables)))
        result = p.decode(p.encode(runner.execute(plan)))
        scheduler.update(step)
        for sid, token in zip(result.seq_ids.tolist(), result.token_ids.tolist()):
            seq = seqs[sid]
            seq.append_token(token, 0.0)
            if seq.num_output_tokens == MAX_TOKENS:
                scheduler.finish(seq, "length")
    assert not scheduler.has_work
    return [s.output_token_ids for s in seqs], scheduler.preemptions


def test_batched_greedy_equals_transformers(tiny):
    path, prompts, expected = tiny
    outputs, preemptions = generate(path, prompts, num_blocks=64)
    assert preemptions == {"swap": 0, "recompute": 0}
    assert outputs == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_sequences_continue_exactly(tiny, mode):
    path, prompts, expected = tiny
    # 48 device slots for 5 sequences of up to 42 tokens: preemption must happen
    outputs, preemptions = generate(path, prompts, num_blocks=12, mode=mode, num_cpu_blocks=64)
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


def test_chunked_prefill_mixed_with_decodes_gives_the_same_tokens(tiny):
    path, prompts, expected = tiny
    outputs, _ = generate(path, prompts, num_blocks=64, max_batched=8)  # 30-token prompt: 4+ chunks
    assert outputs == expected


def test_invalid_plans_are_rejected_without_changing_state(tiny):
    path, prompts, _ = tiny
    runner = make_runner(path, 8)
    good = p.NewSeq(seq_id=1, token_ids=prompts[0], block_table=[0, 1], params={})
    cases = {
        "unknown seq ids": p.StepPlan(step=1, removed=[], new_seqs=[], seq_ids=[5],
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
