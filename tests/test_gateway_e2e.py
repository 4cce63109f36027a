"""The HTTP gateway as users meet it: the real ``openai`` SDK (sync and async, streamed and
not) and raw HTTP against a gateway process in front of a real scheduler and executor.

Greedy answers through HTTP equal the ZeroMQ client's; bad input is a 400 in OpenAI's shape
naming the field and leaves the gateway serving and the pool empty; a client that goes away
mid-stream, or before a whole answer, has its requests aborted and their blocks freed at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from pagedserve.common.client import Client
from pagedserve.common.sampling import SamplingParams
from pagedserve.common.up import stop_processes
from services import Services, free_ports, pagedserve, wait_http

pytestmark = pytest.mark.slow

KEY = "sk-test-gateway"
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"}]


def start_gateway(server: str, *args: str) -> tuple[subprocess.Popen, str]:
    (port,) = free_ports(1)
    proc = pagedserve("gateway", "--port", str(port), "--server", server, *args,
                      env={"PAGEDSERVE_API_KEY": KEY})
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(smollm2_dir):
    (metrics_port,) = free_ports(1)
    services = Services(smollm2_dir, scheduler_args=["--metrics-port", str(metrics_port)])
    gateway, url = start_gateway(services.client, "--scheduler-metrics",
                                 f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        wait_http(f"{url}/health", [gateway])
        with Client(services.client, timeout=120.0) as client:
            model = client.model_info().model
            yield SimpleNamespace(services=services, url=url, client=client, model=model,
                                  sdk=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY,
                                                    max_retries=0, timeout=120.0))
    finally:
        stop_processes([services.scheduler, services.executor, gateway], timeout_s=15)


def http(served, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{served.url}{path}", json=body, headers=headers, timeout=120.0)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def assert_idle(served) -> None:
    """Nothing left running, waiting or holding blocks."""
    assert served.services.admin_cmd("seqs")["seqs"] == []
    assert served.services.pool()["device"]["used"] == 0


# ------------------------------------------------------------------ completions

def test_greedy_completion_equals_the_zeromq_clients(served):
    want = served.client.generate(PROMPT, greedy(12)).outputs[0]
    got = served.sdk.completions.create(model=served.model, prompt=PROMPT, max_tokens=12,
                                        temperature=0.0)
    assert got.id.startswith("cmpl-") and got.object == "text_completion"
    assert got.model == served.model and abs(got.created - time.time()) < 60
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (5, 12)


def test_token_id_prompts_and_n_number_the_choices(served):
    ids = served.client.generate(PROMPT, greedy(1)).prompt_token_ids
    got = served.sdk.completions.create(model=served.model, prompt=[ids, ids[:3]], n=2,
                                        max_tokens=4, temperature=1.0, seed=3)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.usage.prompt_tokens == len(ids) + 3
    assert got.usage.completion_tokens == 16
    want = served.client.generate(ids[:3], greedy(4)).outputs[0].text
    greedy_pair = served.sdk.completions.create(model=served.model, prompt=[ids, ids[:3]],
                                                max_tokens=4, temperature=0.0)
    assert greedy_pair.choices[1].text == want


def test_streamed_completion_concatenates_to_the_whole_and_ends_with_usage(served):
    want = served.client.generate(PROMPT, greedy(10)).outputs[0].text
    chunks = list(served.sdk.completions.create(
        model=served.model, prompt=PROMPT, max_tokens=10, temperature=0.0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_completion_logprobs_and_echo(served):
    got = served.sdk.completions.create(model=served.model, prompt=PROMPT, max_tokens=5,
                                        temperature=0.0, logprobs=2)
    choice = got.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs):
        assert top[token] == logprob  # greedy: the sampled token is the most likely
        assert logprob == max(top.values()) and len(top) == 2
    echoed = served.sdk.completions.create(model=served.model, prompt=PROMPT, max_tokens=5,
                                           temperature=0.0, echo=True, logprobs=2)
    assert echoed.choices[0].text == PROMPT + choice.text
    echoed_logprobs = echoed.choices[0].logprobs
    assert "".join(echoed_logprobs.tokens) == echoed.choices[0].text
    assert echoed_logprobs.token_logprobs[0] is None and echoed_logprobs.text_offset[0] == 0
    assert echoed_logprobs.token_logprobs[-5:] == logprobs.token_logprobs
    # a token-id prompt is echoed as its text, which the scheduler's tokenizer writes
    ids = served.client.generate(PROMPT, greedy(1)).prompt_token_ids
    by_ids = served.sdk.completions.create(model=served.model, prompt=ids, max_tokens=5,
                                           temperature=0.0, echo=True)
    assert by_ids.choices[0].text == PROMPT + choice.text


# ------------------------------------------------------------------ chat

def test_greedy_chat_equals_the_zeromq_clients_and_ends_on_end_of_turn(served):
    want = served.client.chat(CHAT, greedy(64)).outputs[0]
    got = served.sdk.chat.completions.create(model=served.model, messages=CHAT,
                                             max_completion_tokens=64, temperature=0.0)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and "Paris" in want.text
    assert got.choices[0].finish_reason == "stop" == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)


def test_multi_turn_chat_continues_the_conversation(served):
    first = served.sdk.chat.completions.create(model=served.model, messages=CHAT,
                                               max_tokens=32, temperature=0.0)
    turns = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And of Italy?"}]
    want = served.client.chat(turns, greedy(32)).outputs[0].text
    got = served.sdk.chat.completions.create(model=served.model, messages=turns,
                                             max_tokens=32, temperature=0.0)
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_async_streamed_chat_opens_with_the_role_and_concatenates_to_the_whole(served):
    want = served.client.chat(CHAT, greedy(24)).outputs[0].text

    async def run():
        sdk = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
        stream = await sdk.chat.completions.create(
            model=served.model, messages=CHAT, max_tokens=24, temperature=0.0, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        await sdk.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == len(
        served.client.chat(CHAT, greedy(24)).outputs[0].token_ids)


def test_a_raw_chat_stream_ends_with_done(served):
    body = {"messages": CHAT, "max_tokens": 4, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_chat_n_and_logprobs(served):
    got = served.sdk.chat.completions.create(
        model=served.model, messages=CHAT, max_tokens=6, n=2, temperature=0.8, seed=1,
        logprobs=True, top_logprobs=3)
    assert [c.index for c in got.choices] == [0, 1]
    for choice in got.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
                   for t in content)
        assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)


# ------------------------------------------------------------------ bad input, keys, the rest

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "bogus": 1}, "bogus"),
    ("/v1/completions", {"prompt": "word " * 9000}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages")])
def test_bad_input_is_answered_in_openais_shape_and_leaves_the_gateway_serving(
        served, path, body, param):
    response = http(served, path, body)
    assert response.status_code == (404 if param == "model" else 400), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"]
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert_idle(served)


def test_a_prompt_past_the_context_says_so(served):
    message = http(served, "/v1/completions", {"prompt": "word " * 9000}).json()["error"][
        "message"]
    assert "max_model_len" in message


def test_the_sdk_raises_its_own_errors(served):
    with pytest.raises(openai.BadRequestError):
        served.sdk.completions.create(model=served.model, prompt=PROMPT, temperature=-1)
    wrong_key = openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert http(served, "/v1/completions", {"prompt": PROMPT}, key=None).status_code == 401


def test_models_version_and_metrics(served):
    [model] = served.sdk.models.list().data
    assert model.id == served.model
    assert httpx.get(f"{served.url}/version").json()["version"]
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'pagedserve_gateway_requests_total{method="POST",route="/v1/completions"' in metrics
    assert "vllm:generation_tokens_total" in metrics  # the scheduler's, through the gateway
    cpu = [line for line in metrics.splitlines()
           if line.startswith("pagedserve_gateway_process_cpu_seconds_total ")]
    assert len(cpu) == 1 and float(cpu[0].split()[1]) > 0  # its own CPU time, by its name


def test_a_client_gone_mid_stream_frees_its_blocks_at_once(served):
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "temperature": 0.0,
            "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        events = response.iter_lines()
        for _ in range(6):
            next(events)
        [seq] = served.services.admin_cmd("seqs")["seqs"]
        assert seq["request_id"].startswith("cmpl-")
    assert_aborted_at_once(served)


def test_a_client_gone_before_a_whole_answer_frees_its_blocks_at_once(served):
    body = {"prompt": [PROMPT, PROMPT], "max_tokens": 4000, "ignore_eos": True,
            "temperature": 0.0}

    async def leave_while_generating():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as client:
            post = asyncio.ensure_future(client.post(f"{served.url}/v1/completions", json=body))
            while len(seqs := served.services.admin_cmd("seqs")["seqs"]) < 2:
                assert not post.done(), post.result().text
                await asyncio.sleep(0.05)
            assert all(seq["request_id"].startswith("cmpl-") for seq in seqs)
            post.cancel()  # the connection closes with it
            with contextlib.suppress(asyncio.CancelledError):
                await post

    asyncio.run(leave_while_generating())
    assert_aborted_at_once(served)


def assert_aborted_at_once(served) -> None:
    """The requests of a client that has just gone end at once, and leave the pool empty."""
    gone = time.monotonic()
    while served.services.admin_cmd("seqs")["seqs"] and time.monotonic() - gone < 30:
        time.sleep(0.05)
    freed_s = time.monotonic() - gone
    print(f"requests aborted {freed_s:.2f} s after the client went away")
    # under a second on an idle machine; without the abort they would run on for their
    # thousands of tokens, or until the scheduler's 30 s client timeout
    assert freed_s < 10.0
    assert_idle(served)


def test_health_is_503_while_no_executor_is_ready(smollm2_dir):
    client, executor, admin_port = free_ports(3)
    scheduler = pagedserve("scheduler", "--model", str(smollm2_dir), "--client-port",
                           str(client), "--executor-port", str(executor), "--admin-port",
                           str(admin_port))
    gateway, url = start_gateway(f"tcp://127.0.0.1:{client}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/health", timeout=5)
                if health.json().get("status") == "not_ready":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert health.status_code == 503
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "executor_not_ready"
    finally:
        stop_processes([scheduler, gateway])
