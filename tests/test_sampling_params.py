"""vLLM's sampling parameters: validation, the model's defaults, and each logits processor
against transformers' own on the same logits (presence and frequency against a float64
formula, as transformers has none)."""
from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest
import torch
from transformers import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                          RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                          TemperatureLogitsWarper)

from pagedserve.common import protocol as p
from pagedserve.common.sampling import MODEL_DEFAULTS, SamplingParams
from pagedserve.executor_svc import logits_processors
from pagedserve.executor_svc.backends import layer_ops
from pagedserve.executor_svc.mirror import SeqState
from pagedserve.executor_svc.sampler import Sampler
from pagedserve.scheduler_svc.frontend import Frontend, InvalidRequest
from pagedserve.scheduler_svc.generation_config import sampling_defaults
from test_sampler import VOCAB, random_logits, sample, seeded
from tiny_models import word_tokenizer

EOS = 2


def seq(tokens: list[int], num_prompt_tokens: int, **params) -> SeqState:
    """A sequence whose tokens are ``tokens``, the first ``num_prompt_tokens`` its prompt."""
    sampler_params = SamplingParams(**params).sampler_params(frozenset({EOS}))
    return SeqState(list(tokens), [], len(tokens), sampler_params, num_prompt_tokens)


def histories(rows: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    """Token ids with repeats, drawn from a small part of the vocabulary."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 20, length).tolist() for _ in range(rows)]


# ------------------------------------------------------------------ the processors


@pytest.mark.parametrize("penalty", [1.5, 0.6, 1.0])
def test_repetition_penalty_equals_transformers_over_prompt_and_output(penalty):
    logits = random_logits(4)
    tokens = histories(4)
    ours = logits_processors.penalise(logits, [seq(t, 5, repetition_penalty=penalty)
                                               for t in tokens])
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(tokens), logits.clone())
    torch.testing.assert_close(ours, theirs)
    assert (penalty == 1.0) == torch.equal(ours, logits)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = random_logits(3).double()
    tokens = histories(3, length=16, seed=1)
    num_prompt = 6
    penalties = [(0.5, 0.0), (0.0, 1.25), (-1.5, 2.0)]  # (presence, frequency)
    seqs = [seq(t, num_prompt, presence_penalty=pres, frequency_penalty=freq)
            for t, (pres, freq) in zip(tokens, penalties)]
    ours = logits_processors.penalise(logits.float(), seqs)
    expected = logits.clone()
    for row, (t, (pres, freq)) in enumerate(zip(tokens, penalties)):
        counts = np.bincount(t[num_prompt:], minlength=VOCAB)
        expected[row] -= torch.from_numpy(freq * counts + pres * (counts > 0))
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    only_in_prompt = set(tokens[0][:num_prompt]) - set(tokens[0][num_prompt:])
    assert only_in_prompt and all(ours[0, t] == logits.float()[0, t] for t in only_in_prompt)


def test_all_penalties_together_equal_repetition_then_the_formula():
    logits = random_logits(2)
    tokens = histories(2, seed=2)
    seqs = [seq(t, 4, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.7)
            for t in tokens]
    repeated = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(tokens), logits.clone())
    for row, t in enumerate(tokens):
        counts = torch.from_numpy(np.bincount(t[4:], minlength=VOCAB)).float()
        repeated[row] -= 0.7 * counts + 0.4 * (counts > 0)
    torch.testing.assert_close(logits_processors.penalise(logits, seqs), repeated)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_equals_transformers(min_p):
    logits = random_logits(5)
    ours = logits_processors.mask_below_min_p(logits, torch.full((5,), min_p))
    theirs = MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(ours, theirs)


def test_min_tokens_masks_eos_and_stop_tokens_as_transformers_until_reached():
    logits = random_logits(3)
    prompt = [5, 6, 7]
    rows = [seq(prompt + [9] * n, len(prompt), min_tokens=3, stop_token_ids=[11])
            for n in (0, 2, 3)]
    ours = logits_processors.process(logits, rows)
    for row, state in enumerate(rows):
        ids = torch.tensor([state.token_ids])
        theirs = MinNewTokensLengthLogitsProcessor(len(prompt), 3, [EOS, 11])(
            ids, logits[row:row + 1].clone())
        assert torch.equal(ours[row:row + 1], theirs)
    assert ours[:2, [EOS, 11]].isneginf().all() and torch.equal(ours[2], logits[2])


def test_min_tokens_does_not_mask_eos_under_ignore_eos():
    state = seq([5], 1, min_tokens=2, ignore_eos=True, stop_token_ids=[11])
    assert state.params.stop_token_ids == [11]
    assert not logits_processors.adjusts(seq([5], 1, min_tokens=2, ignore_eos=True))


def test_logit_bias_equals_transformers_sequence_bias():
    logits = random_logits(2)
    bias = {3: 5.0, 17: -100.0, 40: 0.25}
    ours = logits_processors.process(logits, [seq([1], 1, logit_bias=bias), seq([1], 1)])
    theirs = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(
        torch.tensor([[1]]), logits[:1].clone())
    torch.testing.assert_close(ours[:1], theirs)
    assert torch.equal(ours[1], logits[1])  # a row without bias is left alone


def test_processors_apply_in_vllms_order_bias_then_min_tokens_then_penalties():
    logits = random_logits(1)
    tokens = [4, 3, 8, 3]
    state = seq(tokens, 2, logit_bias={3: 2.0, EOS: 50.0}, min_tokens=5,
                repetition_penalty=1.7)
    ids = torch.tensor([tokens])
    expected = SequenceBiasLogitsProcessor([[[3], 2.0], [[EOS], 50.0]])(ids, logits.clone())
    expected = MinNewTokensLengthLogitsProcessor(2, 5, [EOS])(ids, expected)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, expected)
    torch.testing.assert_close(logits_processors.process(logits, [state]), expected)


# ------------------------------------------------------------------ the sampler with them


def test_greedy_rows_with_a_penalty_take_the_penalised_argmax():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7], logits[:, 8] = 4.0, 3.0  # 7 leads, and it is in both rows' output
    params = [SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=0),
              SamplingParams(temperature=0)]
    out = sample(logits, params, histories=[[1, 7], [1, 7]])
    assert out.token_ids.tolist() == [8, 7]
    # the logprob and rank reported are the raw distribution's
    raw = torch.log_softmax(logits[0], -1)
    assert out.logprobs[0] == raw[8] and out.ranks[0] == 2


def test_min_p_and_temperature_sample_only_what_transformers_keeps():
    torch.manual_seed(0)
    logits = random_logits(1, seed=3).expand(3000, VOCAB).contiguous()
    tokens = sample(logits, [SamplingParams(temperature=0.7, min_p=0.1)] * 3000).token_ids
    kept = MinPLogitsWarper(0.1)(None, TemperatureLogitsWarper(0.7)(None, logits[:1].clone()))
    allowed = set(kept[0].isfinite().nonzero().flatten().tolist())
    assert set(tokens.tolist()) == allowed and len(allowed) > 1


def test_a_batch_without_processors_never_builds_them(monkeypatch):
    def fail(*args):
        raise AssertionError("processed a batch that asked for no processor")
    monkeypatch.setattr(logits_processors, "process", fail)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5),
              SamplingParams(temperature=0, logprobs=2)]
    sample(random_logits(3), params, [None, seeded(1), None])


def test_only_a_plain_greedy_batch_takes_the_greedy_kernel():
    sampler = Sampler(layer_ops(torch.float32, "cpu"))
    kernel, calls = sampler.greedy, []
    sampler.greedy = lambda logits: calls.append(len(logits)) or kernel(logits)
    logits = random_logits(2)
    sampler(logits, [seq([1], 1, temperature=0)] * 2, [None] * 2)
    sampler(logits, [seq([1], 1, temperature=0),
                     seq([1, 5], 1, temperature=0, presence_penalty=1.0)], [None] * 2)
    sampler(logits, [seq([1], 1, temperature=0, logprobs=0)] * 2, [None] * 2)
    assert calls == [2]


def test_rank_of_the_sampled_token_counts_the_tokens_at_least_as_likely():
    logits = random_logits(4, seed=5)
    out = sample(logits, [SamplingParams(temperature=2.0, logprobs=0)] * 4,
                 [seeded(i) for i in range(4)])
    logprobs = torch.log_softmax(logits, -1)
    expected = (logprobs > logprobs.gather(-1, out.token_ids[:, None])).sum(-1) + 1
    assert torch.equal(out.ranks, expected)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"logit_bias": {5: 101.0}}, r"logit_bias\[5\]"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias token id"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"top_k": 2**40}, "top_k"),
    ({"beam_width": 2, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"beam_width": 2, "logit_bias": {1: 1.0}}, "logit_bias"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty",
                                   "frequency_penalty", "repetition_penalty", "length_penalty"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10**400])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be a finite number"):
        SamplingParams(logit_bias={3: value})


def test_unset_fields_travel_as_none_and_take_the_models_defaults():
    unset = SamplingParams(n=2)
    assert unset.temperature == 1.0 and unset.max_tokens == 16  # vLLM's defaults meanwhile
    wire = unset.to_dict()
    assert all(wire[name] is None for name in MODEL_DEFAULTS)
    model = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 64}
    filled = SamplingParams.from_dict(wire, model)
    assert (filled.temperature, filled.top_p, filled.max_tokens, filled.n) == (0.6, 0.9, 64, 2)
    assert filled.top_k == 0 and filled.repetition_penalty == 1.0  # the model sets none
    explicit = SamplingParams(temperature=1.0, max_tokens=16).to_dict()
    kept = SamplingParams.from_dict(explicit, model)  # set to vLLM's default: still set
    assert (kept.temperature, kept.max_tokens, kept.top_p) == (1.0, 16, 0.9)


def test_generation_config_supplies_the_sampling_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": None,
        "repetition_penalty": 1.1, "max_new_tokens": 256, "eos_token_id": [2, 5]}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                           "repetition_penalty": 1.1, "max_tokens": 256}
    assert sampling_defaults(tmp_path / "missing") == {}


def test_a_generation_config_default_that_is_refused_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match="generation_config.json.*top_p"):
        sampling_defaults(tmp_path)


def test_the_default_models_generation_config_sets_no_sampling_default(smollm2_dir):
    assert sampling_defaults(smollm2_dir) == {}


def frontend(defaults=None) -> Frontend:
    return Frontend(word_tokenizer(eos_token_ids=[EOS]), 512, lambda: 128, 8, defaults)


def generate_msg(**params) -> p.GenerateRequest:
    return p.GenerateRequest(request_id="r", params=SamplingParams(**params).to_dict(),
                             stream=False, prompt="t5 t6")


def test_the_frontend_fills_what_a_request_leaves_unset_from_the_model():
    request = frontend({"temperature": 0.3, "max_tokens": 40}).create(
        b"c", generate_msg(max_tokens=8, min_tokens=2))
    assert (request.params.temperature, request.params.max_tokens) == (0.3, 8)
    # the executor masks EOS until min_tokens
    assert request.sampler_params.stop_token_ids == [EOS]
    assert request.sampler_params.temperature == 0.3


@pytest.mark.parametrize("params, message", [
    ({"logit_bias": {600: 1.0}}, "logit_bias holds token id 600"),
    ({"stop_token_ids": [512]}, "stop_token_ids holds token id 512"),
])
def test_the_frontend_refuses_token_ids_outside_the_vocabulary(params, message):
    with pytest.raises(InvalidRequest, match=message):
        frontend().create(b"c", generate_msg(**params))


def test_logprobs_travel_as_vllms_logprob():
    delta = p.CompletionDelta(index=0, text=" Paris", token_ids=[7042], cumulative_logprob=-0.5,
                              logprobs=[{7042: p.Logprob(-0.5, 2, " Paris"),
                                         9: p.Logprob(-0.25, 1, " the")}])
    msg = p.RequestOutputMsg(request_id="r", outputs=[delta], finished=True)
    back = p.decode(p.encode(msg)).outputs[0].logprobs
    assert back == delta.logprobs and list(back[0]) == [7042, 9]
    assert back[0][7042].rank == 2 and back[0][9].decoded_token == " the"
    raw = msgpack.unpackb(p.encode(msg), strict_map_key=False)
    raw["outputs"][0]["logprobs"] = [{7042: [-0.5, 2]}]
    with pytest.raises(p.ProtocolError, match=r"logprobs\[0\]\[7042\].*logprob, rank"):
        p.decode(msgpack.packb(raw, use_bin_type=True))
