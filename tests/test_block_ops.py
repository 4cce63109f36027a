"""Block operations: swap out (device -> CPU), swap in (CPU -> device), copy (copy-on-write), in the
cache engine and through step plans applied by the model runner."""
import copy
import os
import random

import numpy as np
import pytest
import torch

from pagedserve.common import protocol as p
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.model import ModelConfig, load_model
from pagedserve.executor_svc.model_runner import ModelRunner, PlanError
from tiny_models import make_tiny_model

BLOCK_SIZE = 4
GREEDY = {"temperature": 0.0}
EMPTY_PLAN = dict(removed=[], new_seqs=[], seq_ids=[], num_tokens=[], block_appends=[])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def config(model_dir):
    return ModelConfig.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (6, 5)]


# (device, block_kernel): each path of each device; the kernel runs on CPU in triton's interpreter
DEVICES = [pytest.param("cpu", None, id="cpu"),
           pytest.param("cpu", True, id="cpu-kernel", marks=pytest.mark.skipif(
               os.environ.get("TRITON_INTERPRET") != "1", reason="triton's interpreter")),
           pytest.param("cuda", None, id="cuda", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA device"))]


def make_cache(config, num_device_blocks=8, num_cpu_blocks=4, device="cpu", block_kernel=None):
    """A cache whose every slot holds NaN, so that a read of an unwritten slot shows (all
    but the device's null block, which is zeros by design)."""
    cache = CacheEngine(config, BLOCK_SIZE, num_device_blocks, num_cpu_blocks, torch.float32,
                        device, block_kernel)
    for tensor in all_tensors(cache):
        tensor.fill_(float("nan"))
    for tensor in cache.kv_caches[0] + cache.kv_caches[-1]:
        assert len(tensor) == num_device_blocks + 1
    for layer in cache.kv_caches:
        for tensor in layer:
            tensor[cache.null_block].zero_()
    return cache


def all_tensors(cache):
    return [t for layer in cache.kv_caches + cache.cpu_caches for t in layer]


def randomize(caches):
    for layer in caches:
        for tensor in layer:
            tensor.normal_()


def clone(caches):
    return [tuple(t.clone() for t in layer) for layer in caches]


def settled(cache):
    """``cache`` once its block operations are done (on CUDA they run on a side stream)."""
    cache.synchronize()
    return cache


@pytest.mark.parametrize("device, block_kernel", DEVICES)
def test_each_block_operation_takes_the_path_for_its_device(config, device, block_kernel):
    path = ("one copy_blocks launch" if device == "cuda" or block_kernel
            else "a strided copy per block")
    expected = dict.fromkeys(["swap_out", "swap_in", "copies"], path)
    cache = make_cache(config, device=device, block_kernel=block_kernel)
    assert cache.paths == expected
    assert cache.describe() == next(iter(expected.values()))  # one path for all three


@pytest.mark.parametrize("device, block_kernel", DEVICES)
def test_swap_out_then_swap_in_round_trips_blocks_and_leaves_others_untouched(config, device,
                                                                             block_kernel):
    cache = make_cache(config, device=device, block_kernel=block_kernel)
    randomize(cache.kv_caches)
    original = clone(cache.kv_caches)
    settled(cache).swap_out(torch.tensor([[5, 0], [2, 3]]))
    settled(cache)
    for (k, v), (cpu_k, cpu_v) in zip(original, cache.cpu_caches):
        for dev, cpu in ((k, cpu_k), (v, cpu_v)):
            assert torch.equal(cpu[[0, 3]], dev[[5, 2]].cpu())
            assert cpu[[1, 2]].isnan().all()
    randomize(cache.kv_caches)  # the device blocks are reused while the sequence is out
    before_swap_in = clone(cache.kv_caches)
    settled(cache).swap_in(np.array([[0, 1], [3, 6]]))
    settled(cache)
    untouched = [0, 2, 3, 4, 5, 7]
    for (k, v), (old_k, old_v), (now_k, now_v) in zip(original, before_swap_in, cache.kv_caches):
        for dev, old, now in ((k, old_k, now_k), (v, old_v, now_v)):
            assert torch.equal(now[[1, 6]], dev[[5, 2]])
            assert torch.equal(now[untouched], old[untouched])


@pytest.mark.parametrize("device, block_kernel", DEVICES)
def test_copy_blocks_copies_exactly_the_listed_blocks_in_every_layer(config, device, block_kernel):
    cache = make_cache(config, device=device, block_kernel=block_kernel)
    randomize(cache.kv_caches)
    expected = clone(cache.kv_caches)
    for layer in expected:
        for tensor in layer:
            tensor[[3, 7]] = tensor[[0, 4]]
    settled(cache).copy_blocks([[0, 3], [4, 7]])
    settled(cache)
    for now, want in zip(cache.kv_caches, expected):
        assert all(torch.equal(a, b) for a, b in zip(now, want))
    assert all(t.isnan().all() for layer in cache.cpu_caches for t in layer)


@pytest.mark.parametrize("op, pairs, message", [
    ("swap_out", [[0, 0], [8, 1]], "swap_out: block id 8 is outside the device pool"),
    ("swap_out", [[0, 4]], "swap_out: block id 4 is outside the cpu pool"),
    ("swap_in", [[-1, 0]], "swap_in: block id -1 is outside the cpu pool"),
    ("swap_in", [[0, 9]], "swap_in: block id 9 is outside the device pool"),
    ("swap_in", [[0, 2], [1, 2]], r"destination block appears twice in \[2, 2\]"),
    ("copy_blocks", [[1, 2], [2, 3]], r"block ids \[2\] are both a source and a destination"),
    ("copy_blocks", [1, 2], r"shape \[N, 2\], got \[2\]"),
])
def test_invalid_block_ids_raise_value_error_naming_them(config, op, pairs, message):
    cache = make_cache(config)
    randomize(cache.kv_caches + cache.cpu_caches)
    before = [t.clone() for t in all_tensors(cache)]
    with pytest.raises(ValueError, match=message):
        getattr(cache, op)(pairs)
    assert all(torch.equal(a, b) for a, b in zip(all_tensors(cache), before))


class Driver:
    """Sends a model runner encoded plans, as the scheduler does, and keeps each seq's tokens."""

    def __init__(self, model, config, num_device_blocks=8, num_cpu_blocks=4):
        self.runner = ModelRunner(model, make_cache(config, num_device_blocks, num_cpu_blocks),
                                  BLOCK_SIZE)
        self.step = 0
        self.tokens: dict[int, list[int]] = {}

    def execute(self, **fields) -> None:
        self.step += 1
        plan = p.decode(p.encode(p.StepPlan(step=self.step, **EMPTY_PLAN | fields)))
        result = self.runner.execute(plan)
        for new in plan.new_seqs:
            self.tokens[new.seq_id] = new.token_ids.tolist()
        for seq_id, token in zip(result.seq_ids.tolist(), result.token_ids.tolist()):
            self.tokens[seq_id].append(token)

    def decode(self, *seq_ids, appends=()) -> None:
        self.execute(seq_ids=list(seq_ids), num_tokens=[1] * len(seq_ids),
                     block_appends=list(appends))


def new_seq(seq_id, token_ids, block_table, num_computed_tokens=0, params=GREEDY):
    return p.NewSeq(seq_id=seq_id, token_ids=token_ids, block_table=block_table, params=params,
                    num_computed_tokens=num_computed_tokens)


def alone(model, config, token_ids, num_new):
    """The greedy continuation of ``token_ids`` in a runner of its own, undisturbed."""
    driver = Driver(model, config, num_cpu_blocks=0)
    driver.execute(new_seqs=[new_seq(1, token_ids, list(range(8)))], seq_ids=[1],
                   num_tokens=[len(token_ids)])
    for _ in range(num_new - 1):
        driver.decode(1)
    return driver.tokens[1][len(token_ids):]


def test_swapped_out_sequence_continues_exactly_after_swap_in(model, config, prompts):
    a, b = prompts  # a: 6 tokens, b: 5
    driver = Driver(model, config)
    driver.execute(new_seqs=[new_seq(1, a, [0, 1])], seq_ids=[1], num_tokens=[6])
    driver.decode(1)
    driver.decode(1)
    driver.decode(1, appends=[1, 2])  # a: 10 tokens, 9 in blocks [0, 1, 2]
    # Swap a out; b takes over its device blocks in the same plan and overwrites them.
    driver.execute(removed=[1], swap_out=[0, 2, 1, 0, 2, 1], new_seqs=[new_seq(2, b, [2, 0])],
                   seq_ids=[2], num_tokens=[5])
    driver.decode(2)
    # Swap a back in to other device blocks: its KV covers all its tokens but the last.
    tokens = driver.tokens[1]
    driver.execute(swap_in=[2, 5, 0, 6, 1, 3],
                   new_seqs=[new_seq(1, tokens, [5, 6, 3], len(tokens) - 1)],
                   seq_ids=[1, 2], num_tokens=[1, 1])
    driver.decode(1, 2)
    driver.decode(1, 2, appends=[2, 1])
    driver.decode(1, 2, appends=[1, 4])
    assert driver.tokens[1][len(a):] == alone(model, config, a, 8)
    assert driver.tokens[2][len(b):] == alone(model, config, b, 6)


def test_copy_on_write_gives_each_sharer_its_own_last_block(model, config, prompts):
    a = prompts[0]  # 6 tokens: block 0 full, block 1 holds 2
    driver = Driver(model, config)
    driver.execute(new_seqs=[new_seq(1, a, [0, 1])], seq_ids=[1], num_tokens=[6])
    other = (driver.tokens[1][-1] + 1) % 512  # b continues the shared prompt differently
    # b shares both prompt blocks; before it writes into the partial one, that is copied.
    driver.execute(copies=[1, 2], replace_last=[2, 2],
                   new_seqs=[new_seq(2, [*a, other], [0, 1], num_computed_tokens=6)],
                   seq_ids=[1, 2], num_tokens=[1, 1])
    driver.decode(1, 2)
    driver.decode(1, 2, appends=[1, 3, 2, 4])
    driver.decode(1, 2)
    assert driver.runner.seqs[2].block_table == [0, 2, 4]
    assert driver.tokens[1][len(a):] == alone(model, config, a, 5)
    assert driver.tokens[2][len(a):] == [other, *alone(model, config, [*a, other], 4)]


def test_a_forked_beam_takes_the_chosen_token_and_continues_exactly(model, config, prompts):
    a = prompts[0]  # 6 tokens: block 0 full, block 1 holds 2
    runner = Driver(model, config).runner
    beams = {"beam_width": 2}

    def run(**fields):
        step = p.StepPlan(step=1, **EMPTY_PLAN | fields)
        result = p.decode(p.encode(runner.execute(p.decode(p.encode(step)))))
        assert len(result.seq_ids) == 0  # beams sample nothing: the scheduler chooses
        return {c.seq_id: c.token_ids.tolist() for c in result.beam_candidates}

    first = run(new_seqs=[new_seq(1, a, [0, 1], params=beams)], seq_ids=[1], num_tokens=[6])
    assert len(first[1]) == 4  # 2 x beam_width candidates
    best, second = first[1][:2]
    # Beam 1 continues with its best token; beam 2 forks from it with the second best and
    # writes its token into a copy of the shared partial block.
    after = run(forks=[2, 1, 0], append_tokens=[1, best, 2, second], copies=[1, 2],
                replace_last=[2, 2], seq_ids=[1, 2], num_tokens=[1, 1])
    assert runner.seqs[2].block_table == [0, 2] and runner.seqs[1].block_table == [0, 1]
    assert after[1][0] == alone(model, config, [*a, best], 1)[0]
    assert after[2][0] == alone(model, config, [*a, second], 1)[0]


@pytest.mark.parametrize("bad, message", [
    (dict(swap_out=[0, 0, 8, 1]), "block id 8 is outside the device pool"),
    (dict(swap_out=[0, 0, 1]), "swap_out must hold pairs"),
    (dict(swap_in=[4, 3]), "block id 4 is outside the cpu pool"),
    (dict(copies=[0, 3, 3, 5]), r"\[3\] are both a source and a destination"),
    (dict(replace_last=[7, 3]), "replace_last: unknown seq id 7"),
    (dict(replace_last=[1, 8]), "block id 8 is outside the device pool"),
    (dict(replace_last=[2, 4], new_seqs=[new_seq(2, [5], [])], seq_ids=[1], num_tokens=[1]),
     "seq 2 has no block to replace"),
    (dict(forks=[3, 7, 1]), "fork parent: unknown seq id 7"),
    (dict(forks=[2, 1, 1]), "new seq 2 already exists"),
    (dict(forks=[3, 1]), "forks must hold 3-tuples"),
    (dict(append_tokens=[9, 5]), "append_tokens: unknown seq id 9"),
    (dict(forks=[3, 1, 1], append_tokens=[3, 5], seq_ids=[1, 2, 3], num_tokens=[1, 5, 3]),
     "seq 3: 3 tokens from 6 exceed its 8 tokens"),
])
def test_plan_with_a_bad_block_op_is_rejected_without_changing_state(
        model, config, prompts, bad, message):
    driver = Driver(model, config)
    driver.execute(new_seqs=[new_seq(1, prompts[0], [0, 1])], seq_ids=[1], num_tokens=[6])
    randomize(driver.runner.cache.kv_caches + driver.runner.cache.cpu_caches)
    seqs = copy.deepcopy(driver.runner.seqs)
    tensors = [t.clone() for t in all_tensors(driver.runner.cache)]
    good = dict(swap_out=[0, 0], swap_in=[1, 5], copies=[1, 6],
                new_seqs=[new_seq(2, prompts[1], [2, 3])], seq_ids=[1, 2], num_tokens=[1, 5])
    with pytest.raises(PlanError, match=message):
        driver.execute(**good | bad)
    assert driver.runner.seqs == seqs
    assert all(torch.equal(a, b) for a, b in zip(all_tensors(driver.runner.cache), tensors))
