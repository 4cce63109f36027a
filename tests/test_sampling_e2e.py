"""End to end: vLLM's sampling parameters through real services, on the default model served
from a directory whose generation_config.json sets a repetition penalty and the output length
(the defaults of what a request leaves unset)."""
from __future__ import annotations


import pytest
import torch

from pagedserve.common.client import Client
from pagedserve.common.sampling import SamplingParams
from services import Services, model_with_defaults

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
LIST = "List three animals that live in Africa: 1."
MODEL_DEFAULTS = {"repetition_penalty": 1.3, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory):
    """The default model's files, with MODEL_DEFAULTS added to its generation_config.json."""
    return model_with_defaults(smollm2_dir, tmp_path_factory.mktemp("model"), MODEL_DEFAULTS)


@pytest.fixture(scope="module")
def client(model_dir):
    services = Services(model_dir, executor_args=["--num-device-blocks", "256",
                                                  "--dtype", "float32"])
    try:
        with Client(services.client, timeout=60.0) as c:
            yield c
    finally:
        services.stop()


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    """transformers' own model, in fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_generate(smollm2_dir, hf_model):
    """transformers' greedy generate on one prompt: the new ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    def generate(prompt: str, **kwargs) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf_model.generate(ids, do_sample=False, **kwargs)
        return out[0, ids.shape[1]:].tolist()
    return generate


def test_the_models_default_penalty_changes_greedy_output_as_in_transformers(client,
                                                                             hf_generate):
    penalised = client.generate(LIST, SamplingParams(temperature=0.0)).outputs[0]
    plain = client.generate(LIST, SamplingParams(temperature=0.0,
                                                 repetition_penalty=1.0)).outputs[0]
    assert penalised.token_ids == hf_generate(LIST, max_new_tokens=12, repetition_penalty=1.3)
    assert plain.token_ids == hf_generate(LIST, max_new_tokens=12)
    assert penalised.token_ids != plain.token_ids
    assert len(plain.token_ids) == 12 and plain.finish_reason == "length"  # max_new_tokens


def test_the_earliest_stop_string_ends_the_text_and_none_is_returned(client):
    params = dict(temperature=0.0, max_tokens=8, stop=["is", "Pa"])
    out = client.generate(PROMPT, SamplingParams(**params)).outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (" ", "stop", "Pa")
    streamed = client.stream(PROMPT, SamplingParams(**params))
    assert "".join(delta.outputs[0].text for delta in streamed) == " "
    kept = client.generate(PROMPT, SamplingParams(**params, include_stop_str_in_output=True))
    assert kept.outputs[0].text == " Pa"


def test_logprobs_0_gives_each_sampled_tokens_logprob_rank_and_text(client):
    out = client.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3,
                                                 logprobs=0)).outputs[0]
    assert [list(position) for position in out.logprobs] == [[t] for t in out.token_ids]
    assert out.logprobs[0][out.token_ids[0]].decoded_token == " Paris"
    assert all(position[t].rank == 1 for t, position in zip(out.token_ids, out.logprobs))
    assert out.cumulative_logprob == pytest.approx(
        sum(position[t].logprob for t, position in zip(out.token_ids, out.logprobs)), abs=1e-4)


def test_logit_bias_forces_a_token_whose_logprob_stays_the_models(client):
    forced = 7042  # " Paris"
    out = client.generate(LIST, SamplingParams(temperature=0.0, max_tokens=3, logprobs=1,
                                               logit_bias={forced: 100.0})).outputs[0]
    assert out.token_ids == [forced] * 3
    for position in out.logprobs:
        (first, entry), (top, best) = list(position.items())
        assert first == forced and entry.rank > 1 and top != forced and best.rank == 1
        assert entry.logprob < best.logprob


def test_prompt_logprobs_score_every_prompt_token_even_past_the_prefix_cache(client,
                                                                           hf_model):
    prompt = " ".join([LIST] * 4)  # past two blocks of 16 tokens: cached by the first request
    client.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1))
    out = client.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1,
                                                 prompt_logprobs=2))
    ids = out.prompt_token_ids
    assert len(ids) > 32 and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    with torch.inference_mode():
        expected = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1], -1)
    for token, position, row in zip(ids[1:], out.prompt_logprobs[1:], expected):
        assert next(iter(position)) == token and len(position) in (2, 3)
        assert {1, 2} <= {entry.rank for entry in position.values()}  # the top 2 are in
        for t, entry in position.items():
            assert entry.logprob == pytest.approx(row[t].item(), abs=1e-3)
