"""The gateway without services: OpenAI fields to SamplingParams by vLLM's rules, response
and chunk shapes, logprobs, and the HTTP layer's refusals (bad input, keys, body size)."""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from pagedserve.common.client import CompletionOutput, RequestOutput
from pagedserve.common.protocol import Logprob
from pagedserve.gateway.app import GatewaySettings, create_app
from pagedserve.gateway.cli import is_loopback
from pagedserve.gateway.errors import APIError
from pagedserve.gateway.params import chat_params, completion_params
from pagedserve.gateway.responses import ChatShaper, CompletionShaper
from pagedserve.gateway.schema import ChatCompletionRequest, CompletionRequest
from pagedserve.gateway.streams import EventStreamResponse, merged
from services import ROOT

USER = [{"role": "user", "content": "Hi"}]


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt="Hello", **fields)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=USER, **fields)


# ------------------------------------------------------------------ request -> SamplingParams

def test_completion_fields_reach_sampling_params_under_vllm_names():
    params = completion_params(completion(
        n=2, best_of=3, temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, seed=7, max_tokens=5,
        stop="!", stop_token_ids=[2], ignore_eos=True, logprobs=3, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, min_tokens=2, logit_bias={"5": -100},
        skip_special_tokens=False, include_stop_str_in_output=True))
    assert (params.n, params.best_of, params.temperature, params.top_p, params.top_k,
            params.min_p, params.seed, params.max_tokens) == (2, 3, 0.5, 0.9, 0, 0.1, 7, 5)
    assert (params.stop, params.stop_token_ids, params.ignore_eos, params.logprobs) == (
        ["!"], [2], True, 3)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.min_tokens, params.logit_bias) == (0.5, -0.5, 1.2, 2, {5: -100.0})
    assert not params.skip_special_tokens and params.include_stop_str_in_output


def test_unset_fields_are_left_to_the_server_defaults():
    wire = completion_params(completion()).to_dict()
    assert wire["temperature"] is wire["top_p"] is wire["max_tokens"] is None


def test_chat_max_completion_tokens_wins_and_no_limit_means_the_whole_context():
    assert chat_params(chat(max_tokens=5, max_completion_tokens=9), 2048).max_tokens == 9
    assert chat_params(chat(max_tokens=5), 2048).max_tokens == 5
    assert chat_params(chat(), 2048).max_tokens == 2048


def test_chat_logprobs_is_a_switch_and_top_logprobs_the_count():
    assert chat_params(chat(), 64).logprobs is None
    assert chat_params(chat(logprobs=True), 64).logprobs == 0
    assert chat_params(chat(logprobs=True, top_logprobs=4), 64).logprobs == 4
    with pytest.raises(APIError) as refused:
        chat_params(chat(top_logprobs=4), 64)
    assert (refused.value.status, refused.value.param) == (400, "top_logprobs")


def test_beam_search_width_is_best_of_else_n():
    assert completion_params(completion(use_beam_search=True, n=2, best_of=4,
                                        temperature=0.0)).beam_width == 4
    params = completion_params(completion(use_beam_search=True, n=3, length_penalty=0.5))
    assert (params.beam_width, params.n, params.best_of, params.length_penalty) == (
        3, 3, None, 0.5)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1.0}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2, "best_of": 1}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"top_p": 0.0}, "top_p")])
def test_a_refused_value_is_a_400_naming_the_request_field(fields, param):
    with pytest.raises(APIError) as refused:
        completion_params(completion(**fields))
    assert (refused.value.status, refused.value.param) == (400, param)
    assert param in refused.value.message


def test_a_refused_chat_limit_names_the_field_it_came_from():
    with pytest.raises(APIError) as refused:
        chat_params(chat(max_completion_tokens=0), 64)
    assert refused.value.param == "max_completion_tokens"


def test_logit_bias_keys_must_be_token_ids():
    with pytest.raises(APIError) as refused:
        completion_params(completion(logit_bias={"hello": 1.0}))
    assert refused.value.param == "logit_bias" and "'hello'" in refused.value.message


# ------------------------------------------------------------------ responses and chunks

def output(prompt_ids, *completions, prompt="Hello", finished=True) -> RequestOutput:
    return RequestOutput(request_id="r", prompt=prompt, prompt_token_ids=prompt_ids,
                         outputs=list(completions), finished=finished)


def test_completion_response_numbers_choices_per_prompt_and_sums_usage():
    shaper = CompletionShaper("m", n=2, echo=False, logprobs=False)
    outs = [output([1, 2], CompletionOutput(0, " a", [5], finish_reason="length"),
                   CompletionOutput(1, " b.", [6, 7], finish_reason="stop", stop_reason=2)),
            output([3], CompletionOutput(0, " c", [8], finish_reason="length"),
                   CompletionOutput(1, " d", [9], finish_reason="length"))]
    body = shaper.response(outs)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "m"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, " a", "length"), (1, " b.", "stop"), (2, " c", "length"), (3, " d", "length")]
    assert body["choices"][1]["stop_reason"] == 2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_echo_puts_the_prompt_before_the_first_text_only():
    shaper = CompletionShaper("m", n=1, echo=True, logprobs=False)
    first = shaper.chunk(0, output([1], CompletionOutput(0, " a", [5]), finished=False), True)
    later = shaper.chunk(0, output([1], CompletionOutput(0, " b", [6])), False)
    assert first["choices"][0]["text"] == "Hello a" and later["choices"][0]["text"] == " b"
    assert shaper.usage() == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_chat_response_and_stream_chunks():
    shaper = ChatShaper("m", n=1, top_logprobs=None)
    body = shaper.response(output([1, 2], CompletionOutput(0, "Hi!", [5, 6],
                                                           finish_reason="stop")))
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["total_tokens"] == 4

    stream = ChatShaper("m", n=2, top_logprobs=None)
    [opening] = stream.opening()
    assert opening["object"] == "chat.completion.chunk"
    assert [c["delta"] for c in opening["choices"]] == [{"role": "assistant", "content": ""}] * 2
    chunk = stream.chunk(0, output([1], CompletionOutput(1, "x", [5]), finished=False), True)
    assert chunk["choices"][0]["index"] == 1 and chunk["choices"][0]["delta"] == {"content": "x"}
    assert chunk["id"] == opening["id"] and chunk["usage"] is None
    assert stream.usage_chunk()["choices"] == [] and stream.usage_chunk()["usage"][
        "prompt_tokens"] == 1


STEPS = [{5: Logprob(-0.5, 1, " a"), 9: Logprob(-1.5, 2, " z")},
         {6: Logprob(-2.0, 3, "b"), 7: Logprob(-0.1, 1, "c"), 8: Logprob(-float("inf"), 2, "d")}]


def test_completion_logprobs_list_tokens_top_tokens_and_offsets():
    shaper = CompletionShaper("m", n=1, echo=True, logprobs=True)
    body = shaper.response([output([1], CompletionOutput(0, " ab", [5, 6], logprobs=STEPS))])
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" a", "b"] and logprobs["token_logprobs"] == [-0.5, -2.0]
    assert logprobs["top_logprobs"] == [{" a": -0.5, " z": -1.5},
                                        {"c": -0.1, "d": -9999.0, "b": -2.0}]
    assert logprobs["text_offset"] == [5, 7]  # after the echoed "Hello"


def test_echoed_logprobs_begin_with_the_prompts_its_first_token_without_any():
    shaper = CompletionShaper("m", n=1, echo=True, logprobs=True)
    out = output([1, 4], CompletionOutput(0, " ab", [5, 6], logprobs=STEPS))
    out.prompt_logprobs = [None, {4: Logprob(-3.0, 5, "lo"), 3: Logprob(-0.2, 1, "p")}]
    logprobs = shaper.response([out])["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Hel", "lo", " a", "b"]
    assert logprobs["token_logprobs"] == [None, -3.0, -0.5, -2.0]
    assert logprobs["top_logprobs"][:2] == [None, {"p": -0.2, "lo": -3.0}]
    assert logprobs["text_offset"] == [0, 3, 5, 7]


def test_chat_logprobs_hold_the_top_n_by_rank_with_bytes():
    shaper = ChatShaper("m", n=1, top_logprobs=1)
    body = shaper.response(output([1], CompletionOutput(0, " ab", [5, 6], logprobs=STEPS)))
    content = body["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [
        (" a", -0.5, [32, 97]), ("b", -2.0, [98])]
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == [[" a"], ["c"]]


# ------------------------------------------------------------------ the HTTP layer alone

@pytest.fixture(scope="module")
def http():
    """The app with a key, in front of no scheduler: what it refuses before asking one."""
    with TestClient(create_app(GatewaySettings(server="tcp://127.0.0.1:9", api_key="k"))) as c:
        c.headers["Authorization"] = "Bearer k"
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": "1"}, "temperature"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "temprature": 1}, "temprature"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({}, "prompt")])
def test_bad_completion_bodies_are_400_naming_the_field(http, body, param):
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["param"] == param and param in error["message"]


def test_malformed_json_and_bad_chat_messages_are_400(http):
    error = error_of(http.post("/v1/chat/completions", content=b'{"messages": [',
                               headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in error["message"]
    assert error_of(http.post("/v1/chat/completions", json={"messages": []}),
                    400)["param"] == "messages"
    assert error_of(http.post("/v1/chat/completions",
                              json={"messages": [{"role": "robot", "content": "x"}]}),
                    400)["param"] == "messages"


def test_a_missing_or_wrong_key_is_401_and_health_needs_none(http):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Basic k"}):
        error = error_of(http.post("/v1/completions", json={"prompt": "x"}, headers=headers),
                         401)
        assert error["code"] == "invalid_api_key"
    assert http.get("/version", headers={"Authorization": ""}).status_code == 200


def test_a_body_over_the_cap_is_413_before_it_is_read(http):
    error_of(http.post("/v1/completions", content=b"x" * (17 << 20)), 413)


def test_the_gateway_imports_neither_torch_nor_a_service():
    code = ("import sys\nimport pagedserve.gateway.cli, pagedserve.gateway.app\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith(('pagedserve.scheduler_svc', 'pagedserve.executor_svc')))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_only_loopback_hosts_count_as_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_a_public_host_without_a_key_is_refused():
    result = subprocess.run([sys.executable, "-m", "pagedserve.common.cli", "gateway",
                             "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 2 and "--api-key" in result.stderr


def test_up_refuses_a_scheduler_metrics_port_on_the_gateways_port(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pagedserve.common.cli", "up", "--model",
                             str(tmp_path), "--metrics-port", "9123", "--http-port", "9123"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--metrics-port 9123" in result.stderr


def test_chat_messages_reach_the_template_with_text_parts_joined_and_names_kept():
    request = ChatCompletionRequest(messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "ana"}, {"role": "assistant", "content": "c"}])
    assert [m.to_dict() for m in request.messages] == [
        {"role": "user", "content": "a\nb", "name": "ana"}, {"role": "assistant", "content": "c"}]


# ------------------------------------------------------------------ event streams

def _events_until_closed(log: list[str], fail_at: int | None = None):
    async def events():
        try:
            for i in range(1000):
                if i == fail_at:
                    raise RuntimeError("the stream broke")
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)
        finally:
            log.append("closed")
    return events()


def test_an_event_stream_sends_every_event_and_closes_its_generator():
    log, sent = [], []

    async def receive():
        await asyncio.Event().wait()  # the client stays

    async def send(message):
        sent.append(message)

    async def run():
        response = EventStreamResponse(_events_until_closed(log))
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    asyncio.run(run())
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert len(bodies) == 1000 and log == ["closed"] and sent[0]["status"] == 200


def test_a_client_gone_mid_stream_closes_the_generator_before_the_response_returns():
    log, sent = [], []

    async def run():
        left = asyncio.Event()

        async def receive():
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if len(sent) == 5:
                left.set()
        response = EventStreamResponse(_events_until_closed(log))
        await response({"type": "http"}, receive, send)
        assert log == ["closed"]  # closed already: its requests are aborted at once
    asyncio.run(run())
    assert 5 <= len(sent) < 1000


def test_an_error_in_an_event_stream_is_raised_after_its_generator_closes():
    log = []

    async def receive():
        await asyncio.Event().wait()

    async def send(message):
        pass

    async def run():
        await EventStreamResponse(_events_until_closed(log, fail_at=3))(
            {"type": "http"}, receive, send)
    with pytest.raises(RuntimeError, match="broke"):
        asyncio.run(run())
    assert log == ["closed"]


def test_one_merged_stream_is_its_items_and_an_early_exit_closes_it():
    log = []

    async def run():
        got = []
        async with contextlib.aclosing(merged([_events_until_closed(log)])) as items:
            async for index, item in items:
                got.append((index, item))
                if len(got) == 3:
                    break
        return got
    assert asyncio.run(run()) == [(0, "data: 0\n\n"), (0, "data: 1\n\n"), (0, "data: 2\n\n")]
    assert log == ["closed"]
