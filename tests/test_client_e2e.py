"""The client against real services: chats in the model's template, model info, and a stream
left early or a client closed mid-stream aborting its request at once."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import time

import pytest

from pagedserve.common.client import AsyncClient, Client, InvalidRequestError
from pagedserve.common.sampling import SamplingParams
from services import admin, free_ports, pagedserve, services_fixtures

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)
IM_END = 2  # SmolLM2's end-of-turn token, <|im_end|>, its eos
# A client that stops sending is taken for gone after this long: a request that ends well
# before it was aborted by its client, not timed out.
CLIENT_TIMEOUT_S = 120
ABORTED_WITHIN_S = 10  # the scheduler forgets an aborted request as the abort arrives
FREED_WITHIN_S = 60    # its blocks go at the next step, however slow a loaded machine is


services, client = services_fixtures(CLIENT_TIMEOUT_S, num_device_blocks=256)


def test_greedy_chat_equals_transformers_and_ends_on_end_of_turn(client, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = client.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=64))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(torch.tensor([ids]), do_sample=False,
                                  max_new_tokens=64)[0, len(ids):].tolist()
    completion = out.outputs[0]
    assert out.prompt_token_ids == ids  # rendered here, not given a second BOS there
    assert out.prompt == tok.apply_chat_template(QUESTION, tokenize=False,
                                                 add_generation_prompt=True)
    assert completion.token_ids == expected
    assert completion.token_ids[-1] == IM_END and completion.finish_reason == "stop"
    assert "Paris" in completion.text and "<|im_end|>" not in completion.text


def test_chat_stream_deltas_add_up_to_the_chat(client):
    messages = [{"role": "system", "content": "Answer briefly."}, *QUESTION,
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    whole = client.chat(messages, params).outputs[0]
    deltas = list(client.chat_stream(messages, params))
    assert "".join(d.outputs[0].text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == whole.token_ids
    assert deltas[-1].finished and whole.finish_reason == "stop"


def test_generate_chat_command_answers_the_prompt_as_a_user_message(client, services):
    params = SamplingParams(temperature=0.0, max_tokens=64)
    expected = client.chat(QUESTION, params).outputs[0].text
    for stream in ([], ["--stream"]):
        cli = pagedserve("generate", "--chat", QUESTION[0]["content"], "--max-tokens", "64",
                         "--temperature", "0", "--server", services.client, *stream,
                         stdout=subprocess.PIPE, text=True)
        stdout, _ = cli.communicate(timeout=60)
        assert cli.returncode == 0 and stdout == expected + "\n"


def test_model_info_of_a_ready_scheduler(client, services, smollm2_dir):
    info = client.model_info()
    assert (info.model, info.executor_ready, info.vocab_size) == \
        (smollm2_dir.name, True, 49152)
    # lowered to what the executor's pool holds, as health says
    assert info.max_model_len == services.admin_cmd("health")["max_model_len"] < 8192
    assert info.special_tokens["eos_token"] == "<|im_end|>" and not info.adds_bos_token


def test_model_info_and_chat_template_override_before_any_executor(smollm2_dir, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    client_port, executor_port, admin_port = free_ports(3)
    scheduler = pagedserve("scheduler", "--model", str(smollm2_dir), "--client-port",
                           str(client_port), "--executor-port", str(executor_port),
                           "--admin-port", str(admin_port), "--max-model-len", "1000",
                           "--chat-template", str(template))
    try:
        with Client(f"tcp://127.0.0.1:{client_port}", timeout=30.0) as c:
            info = c.model_info()
            assert (info.executor_ready, info.max_model_len) == (False, 1000)
            assert info.chat_template == template.read_text()
            assert c.render_chat(QUESTION) == "user: What is the capital of France?\n<|im_end|>"
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=15)


def test_broken_chat_template_stops_the_scheduler_at_start(smollm2_dir, tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}")
    client_port, executor_port, admin_port = free_ports(3)
    scheduler = pagedserve("scheduler", "--model", str(smollm2_dir), "--client-port",
                           str(client_port), "--executor-port", str(executor_port),
                           "--admin-port", str(admin_port), "--chat-template", str(template),
                           stderr=subprocess.PIPE, text=True)
    _, stderr = scheduler.communicate(timeout=60)
    assert scheduler.returncode != 0 and "does not compile" in stderr


def test_chat_a_template_refuses_is_an_invalid_request(client):
    with pytest.raises(InvalidRequestError, match="message 0 must be a dict"):
        client.chat(["not a message"])


def _live(services) -> bool:
    return admin(services.admin, "health")["live_requests"] > 0


def _wait_aborted(services) -> None:
    """Until the scheduler holds no request, and then no block."""
    for done, within_s in ((lambda: not _live(services), ABORTED_WITHIN_S),
                           (lambda: services.pool()["device"]["used"] == 0, FREED_WITHIN_S)):
        deadline = time.monotonic() + within_s
        while not done():
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.05)


@pytest.mark.parametrize("close_client", [True, False])
def test_leaving_a_stream_early_aborts_its_request_at_once(services, close_client, caplog):
    async def leave_early():
        client = AsyncClient(services.client, timeout=30.0)
        stream = client.stream("def fibonacci(n):", LONG)
        async for delta in stream:
            if delta.outputs[0].token_ids:
                break
        assert _live(services)
        if close_client:
            await client.close()
        else:
            del stream  # leaving the loop dropped the last reference but this one
            await asyncio.sleep(0)
        await asyncio.to_thread(_wait_aborted, services)
        if not close_client:
            await client.close()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(leave_early())
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_closing_a_client_with_a_live_stream_aborts_it(services):
    client = Client(services.client, timeout=30.0)
    stream = client.stream("Here is a short poem about the sea:", LONG)
    next(stream)
    assert _live(services)
    client.close()  # the stream is neither finished nor closed
    _wait_aborted(services)
