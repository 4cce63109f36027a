"""The sampler: greedy, temperature, top-k, top-p, seeds and logprobs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.backends import layer_ops
from pagedserve.executor_svc.mirror import SeqState
from pagedserve.executor_svc.sampler import Sampler

VOCAB = 100
EOS = frozenset({2})


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits, params, generators=None, histories=None, num_prompt_tokens=1):
    """As the model runner samples on this CPU: row i is a sequence sampled with ``params[i]``
    whose tokens are ``histories[i]`` (default: a one-token prompt), the first
    ``num_prompt_tokens`` of them its prompt."""
    histories = histories or [[0]] * len(params)
    seqs = [SeqState(list(tokens), [], len(tokens), p.sampler_params(EOS), num_prompt_tokens)
            for p, tokens in zip(params, histories)]
    sampler = Sampler(layer_ops(torch.float32, "cpu"))
    return sampler(logits, seqs, generators or [None] * len(params))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_takes_the_argmax():
    logits = random_logits(8)
    out = sample(logits, [SamplingParams(temperature=0)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_rows_keep_the_argmax_in_a_sampled_batch():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0)] * 3
    out = sample(logits, params, [None, seeded(1)] * 3)
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))


def test_top_k_1_is_greedy_at_any_temperature():
    logits = random_logits(6)
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.1, 0.7, 1.0, 2.0, 10.0, 100.0)]
    out = sample(logits, params, [None, seeded(3)] * 3)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_batch_companions():
    logits = random_logits(4)
    params = SamplingParams(temperature=1.5, seed=7)
    gen_alone, gen_batched = seeded(7), seeded(7)
    batch = [SamplingParams(temperature=0.5, top_k=5), params, SamplingParams(temperature=0),
             SamplingParams(top_p=0.5)]
    generators = [None, gen_batched, None, seeded(99)]
    alone = [sample(logits[1:2], [params], [gen_alone]).token_ids.item() for _ in range(10)]
    batched = [sample(logits, batch, generators).token_ids[1].item() for _ in range(10)]
    assert alone == batched
    assert len(set(alone)) > 1  # it really sampled


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    counts = torch.bincount(sample(logits, [SamplingParams()] * 4000).token_ids, minlength=4)
    torch.testing.assert_close(counts / 4000, probs, rtol=0, atol=0.03)


def test_top_p_excludes_tokens_outside_the_nucleus():
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4).contiguous()
    tokens = sample(logits, [SamplingParams(top_p=0.7)] * 4000).token_ids
    counts = torch.bincount(tokens, minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 already covers 0.7
    torch.testing.assert_close(counts[0] / 4000, torch.tensor(0.5 / 0.8), rtol=0, atol=0.03)


def test_top_k_keeps_only_the_k_most_likely():
    torch.manual_seed(0)
    logits = random_logits(1).expand(2000, VOCAB).contiguous()
    tokens = sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 2000).token_ids
    assert set(tokens.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_logprob_is_of_the_sampled_token_under_the_raw_distribution():
    logits = random_logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.3),
              SamplingParams(top_k=4), SamplingParams(temperature=3.0, top_p=0.5)]
    out = sample(logits, params)
    expected = torch.log_softmax(logits, -1).gather(-1, out.token_ids[:, None]).squeeze(1)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, expected)


def test_top_logprobs_are_sorted_and_sized_by_the_largest_request():
    logits = random_logits(3)
    out = sample(logits, [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0),
                          SamplingParams(temperature=0, logprobs=5)])
    logprobs = torch.log_softmax(logits, -1)
    assert out.top_token_ids.shape == out.top_logprobs.shape == (3, 5)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_token_ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(out.top_logprobs, logprobs.gather(-1, out.top_token_ids))
    torch.testing.assert_close(out.top_logprobs, logprobs.topk(5).values)


def test_no_logprobs_requested_gives_zero_columns():
    out = sample(random_logits(2), [SamplingParams(temperature=0)] * 2)
    assert out.top_token_ids.shape == out.top_logprobs.shape == (2, 0)


def test_all_greedy_batch_is_the_same_through_the_cpu_kernel_and_torch(monkeypatch):
    logits = random_logits(5, seed=4)
    params = [SamplingParams(temperature=0)] * 5
    fast = sample(logits, params)
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    slow = sample(logits, params)
    assert torch.equal(fast.token_ids, slow.token_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, rtol=1e-5, atol=1e-5)
    assert fast.top_token_ids.shape == slow.top_token_ids.shape == (5, 0)
    assert fast.top_logprobs.shape == slow.top_logprobs.shape == (5, 0)
    assert fast.top_token_ids.dtype == slow.top_token_ids.dtype


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("params", [
    [SamplingParams(temperature=0)] * 4,  # the greedy kernel, on bf16 as they are
    [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=1.5, seed=7)] * 2])
def test_a_bf16_models_logits_sample_as_their_float32_widening(monkeypatch, kernels, params):
    """A bf16 model's head gives bf16 logits (``compute_logits``); every path reads them as
    the float32 numbers they are."""
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    logits = random_logits(4, seed=5).bfloat16()
    generators = [[seeded(p.seed) if p.seed is not None else None for p in params]
                  for _ in range(2)]
    half = sample(logits, params, generators[0])
    wide = sample(logits.float(), params, generators[1])
    assert torch.equal(half.token_ids, wide.token_ids)
    assert half.logprobs.dtype == torch.float32
    torch.testing.assert_close(half.logprobs, wide.logprobs, rtol=0, atol=0)
    assert torch.equal(half.top_token_ids, wide.top_token_ids)
    torch.testing.assert_close(half.top_logprobs, wide.top_logprobs, rtol=0, atol=0)


# Params that validation lets through but float32 cannot carry: 5e-324 and 1e-39 are 0 there,
# so dividing by them gave inf logits and NaN probabilities, and the draw an index past the
# vocabulary, which failed the whole step for every sequence in it.
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=5e-324), SamplingParams(temperature=1e-39),
    SamplingParams(temperature=9e-6, seed=3),
    SamplingParams(repetition_penalty=1e-300), SamplingParams(repetition_penalty=1e-40),
    SamplingParams(repetition_penalty=1e300), SamplingParams(top_p=1e-300),
    SamplingParams(top_p=1e-300, temperature=1e-300)])
def test_extreme_params_sample_tokens_of_the_vocabulary_beside_other_rows(params):
    logits = random_logits(4, seed=5)
    logits[1, 1] = 0.0  # a logit of 0 on a penalised token: 0 x inf would be NaN
    ordinary = SamplingParams(temperature=0.8, seed=11)
    histories = [[0, 1, 3]] * 4
    out = sample(logits.clone(), [params, params, ordinary, params], [None, None, seeded(1), None],
                 histories)
    alone = sample(logits[2:3].clone(), [ordinary], [seeded(1)], histories[:1])
    assert ((out.token_ids >= 0) & (out.token_ids < VOCAB)).all()
    assert out.token_ids[2] == alone.token_ids[0]  # the ordinary row is untouched
    if params.greedy:  # below GREEDY_BELOW: the argmax, as vLLM
        assert out.token_ids.tolist()[:2] == logits[:2].argmax(-1).tolist()
    if params.top_p < 1e-10:  # the nucleus is the top token alone
        assert out.token_ids[0] == logits[0].argmax()


def test_a_row_of_nan_logits_takes_a_token_of_the_vocabulary_and_spares_the_others():
    logits = random_logits(3, seed=6)
    logits[1] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    out = sample(logits.clone(), params, [seeded(s) for s in (1, 2, 3)])
    assert ((out.token_ids >= 0) & (out.token_ids < VOCAB)).all()
    assert torch.isnan(out.logprobs[1]) and torch.isfinite(out.logprobs[[0, 2]]).all()
    for row in (0, 2):
        alone = sample(logits[row:row + 1].clone(), [params[row]], [seeded(row + 1)])
        assert out.token_ids[row] == alone.token_ids[0]


@settings(max_examples=150, deadline=None)
@given(temperature=st.one_of(st.floats(0.0, 3.0), st.sampled_from([5e-324, 1e-39, 1e-5])),
       top_p=st.floats(0.0, 1.0, exclude_min=True), top_k=st.integers(0, VOCAB + 5),
       min_p=st.floats(0.0, 1.0),
       repetition_penalty=st.floats(0.0, 1e308, exclude_min=True),
       frequency_penalty=st.floats(-2.0, 2.0), presence_penalty=st.floats(-2.0, 2.0))
def test_any_valid_params_sample_a_token_of_the_vocabulary_with_a_finite_logprob(**fields):
    params = SamplingParams(**fields)
    out = sample(random_logits(2, seed=8), [params, params], histories=[[0, 1, 5, 5]] * 2,
                 num_prompt_tokens=2)
    assert ((out.token_ids >= 0) & (out.token_ids < VOCAB)).all()
    assert torch.isfinite(out.logprobs).all()
