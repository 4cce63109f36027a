"""End to end: scheduler and executor as separate processes on loopback, real SmolLM2. The
executor overlaps steps (``--overlap-steps on``, as on a GPU: a plan sent ahead is launched
before the step in flight is read back), so every behaviour here holds with it too; the
other end-to-end modules run the CPU's default, off."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from pagedserve.common import protocol as p
from pagedserve.common.client import Client, InvalidRequestError
from pagedserve.common.sampling import SamplingParams
from services import admin, free_ports, pagedserve, services_fixtures

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite breakfast is",
    "In 1969, the first person to walk on the moon was",
    "List three animals that live in Africa: 1.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
CLIENT_TIMEOUT_S = 5  # live clients send a heartbeat every second


services, client = services_fixtures(CLIENT_TIMEOUT_S, num_device_blocks=1024,
                                     executor_args=("--overlap-steps", "on"))


@pytest.fixture(scope="module")
def hf_generate(smollm2_dir):
    """transformers' own generate on one prompt alone (no padding), in fp32: the new ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    def generate(prompt: str, **kwargs) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        eos = model.generation_config.eos_token_id  # beams that end early are padded with it
        return new[:new.index(eos) + 1] if eos in new else new
    return generate


@pytest.fixture(scope="module")
def hf_greedy(hf_generate):
    return [hf_generate(prompt, max_new_tokens=32) for prompt in PROMPTS]


def test_greedy_outputs_match_transformers_for_concurrent_prompts(client, hf_greedy):
    outs = client.generate(PROMPTS, GREEDY)  # submitted together: they batch with mixed lengths
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy
    assert outs[0].outputs[0].text.startswith(" Paris")


def test_64_requests_from_4_threads_all_complete(client, services):
    results: dict[int, object] = {}

    def worker(k: int) -> None:
        for i in range(k, 64, 4):
            params = SamplingParams(temperature=0.0, max_tokens=4 + i % 13, ignore_eos=True)
            results[i] = client.generate(PROMPTS[i % 8] + f" ({i})", params)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(64))
    for i, out in results.items():
        assert len(out.outputs[0].token_ids) == 4 + i % 13
        assert out.outputs[0].finish_reason == "length"
    assert services.pool()["device"]["used"] == 0


def test_streamed_deltas_concatenate_to_the_final_text(client):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    whole = client.generate(PROMPTS[1], params).outputs[0]
    deltas = list(client.stream(PROMPTS[1], params))
    assert len(deltas) > 1 and deltas[-1].finished
    assert "".join(d.outputs[0].text for d in deltas) == whole.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == whole.token_ids


def test_stop_string_ends_the_output_and_is_not_returned(client):
    out = client.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20,
                                                     stop=["answer"])).outputs[0]
    assert out.text == " Paris.\n\nThe "
    assert (out.finish_reason, out.stop_reason) == ("stop", "answer")
    streamed = list(client.stream(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20,
                                                             stop=["answer"])))
    assert "".join(d.outputs[0].text for d in streamed) == out.text


def test_stop_token_id_and_logprobs(client):
    out = client.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20, logprobs=2,
                                                     stop_token_ids=[198])).outputs[0]
    assert out.token_ids == [7042, 30, 198]  # " Paris" "." "\n"
    assert (out.finish_reason, out.stop_reason) == ("stop", 198)
    assert len(out.logprobs) == 3
    for token, top in zip(out.token_ids, out.logprobs):
        assert len(top) == 2 and next(iter(top)) == token and top[token].rank == 1  # greedy
    assert out.cumulative_logprob == pytest.approx(sum(t[k].logprob for k, t in
                                                       zip(out.token_ids, out.logprobs)), abs=1e-4)


def test_seeded_sampling_does_not_depend_on_batch_companions(client):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    alone = client.generate(PROMPTS[3], params).outputs[0].token_ids
    together = client.generate([PROMPTS[3], PROMPTS[4], PROMPTS[5]],
                               [params, SamplingParams(temperature=1.0, max_tokens=16),
                                SamplingParams(temperature=0.0, max_tokens=16)])
    assert together[0].outputs[0].token_ids == alone


def test_abort_stops_the_request_and_frees_its_blocks(client, services):
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    stream = client.stream(PROMPTS[2], params, request_id="to-abort")
    first = next(stream)
    assert services.pool()["device"]["used"] > 0
    client.abort("to-abort")
    rest = list(stream)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(first.outputs[0].token_ids) + sum(len(d.outputs[0].token_ids) for d in rest) < 2000
    wait_for(lambda: services.pool()["device"]["used"] == 0)  # released at the next step


def test_requests_of_a_client_that_died_are_aborted_and_their_blocks_freed(services, client):
    script = (
        "import sys\n"
        "from pagedserve.common.client import Client\n"
        "from pagedserve.common.sampling import SamplingParams\n"
        f"with Client({services.client!r}) as c:\n"
        "    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True)\n"
        f"    for _ in c.stream({PROMPTS[1]!r}, params):\n"
        "        print('streaming', flush=True)\n")
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1], text=True)
    try:
        assert doomed.stdout.readline() == "streaming\n"
        assert services.pool()["device"]["used"] > 0
        doomed.kill()  # no abort, no goodbye: only its heartbeats stop
        doomed.wait()
        wait_for(lambda: services.pool()["device"]["used"] == 0, timeout_s=CLIENT_TIMEOUT_S + 10)
    finally:
        doomed.kill()
    out = client.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2))
    assert out.outputs[0].text == " Paris."


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def raw_request(address: str, payload: bytes) -> p.ErrorMsg:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(payload)
        assert sock.poll(10_000), "no reply to a bad message"
        return p.decode(sock.recv())
    finally:
        sock.close()


def generate_msg(**fields) -> dict:
    msg = {"v": p.PROTOCOL_VERSION, "type": "generate", "request_id": "bad", "stream": False,
           "params": {"max_tokens": 4}, "prompt": "hello"}
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not None}


BAD_INPUTS = {
    "malformed msgpack": (b"\xc1\x00garbage", "malformed msgpack"),
    "not a map": (msgpack.packb([1, 2, 3]), "must be a map"),
    "unknown type": (msgpack.packb({"v": 1, "type": "launch_rockets"}), "unknown message type"),
    "wrong version": (msgpack.packb(generate_msg(v=99)), "unsupported protocol version 99"),
    "missing field": (msgpack.packb(generate_msg(params=None)), "missing field 'params'"),
    "wrong field type": (msgpack.packb(generate_msg(stream="yes")), "generate.stream"),
    "negative max_tokens": (msgpack.packb(generate_msg(params={"max_tokens": -3})),
                            "max_tokens must be >= 1, got -3"),
    "unknown param": (msgpack.packb(generate_msg(params={"temprature": 1.0})), "temprature"),
    "prompt too long": (msgpack.packb(generate_msg(prompt="hi " * 9000)), "max_model_len"),
    "token out of vocab": (msgpack.packb(generate_msg(prompt=None, prompt_token_ids=p.pack_ints(
        [1, 10**6]))), "outside the vocabulary"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_and_others_keep_being_served(name, services, client):
    payload, expected = BAD_INPUTS[name]
    reply = raw_request(services.client, payload)
    assert isinstance(reply, p.ErrorMsg) and expected in reply.message
    out = client.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2))
    assert out.outputs[0].text == " Paris."


def test_invalid_params_raise_typed_error_through_the_client(client):
    with pytest.raises(InvalidRequestError, match="more than this server's max_num_seqs"):
        client.generate(PROMPTS[0], SamplingParams(n=1000))
    with pytest.raises(InvalidRequestError, match="beam search cannot stream"):
        list(client.stream(PROMPTS[0], SamplingParams(beam_width=2)))


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_returns_the_best_sequence_transformers_returns(client, hf_generate,
                                                                    width):
    prompts = PROMPTS[:4]
    outs = client.generate(prompts, SamplingParams(beam_width=width, n=2, max_tokens=16))
    want = [hf_generate(prompt, num_beams=width, max_new_tokens=16) for prompt in prompts]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(len(o.outputs) == 2 and o.outputs[0].text for o in outs)


def test_seeded_parallel_samples_are_reproducible_and_differ(client):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = client.generate(PROMPTS[5], params)
    again = client.generate(PROMPTS[5], params)
    samples = [o.token_ids for o in first.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert samples == [o.token_ids for o in again.outputs]
    assert len({tuple(s) for s in samples}) == 3
    streamed = [[], [], []]
    for delta in client.stream(PROMPTS[5], params):
        for out in delta.outputs:
            streamed[out.index] += out.token_ids
    assert streamed == samples


def test_best_of_returns_the_most_likely_of_its_samples(client):
    params = SamplingParams(n=1, best_of=4, temperature=1.0, seed=3, max_tokens=8)
    best = client.generate(PROMPTS[6], params).outputs
    samples = client.generate(PROMPTS[6], SamplingParams(
        n=4, temperature=1.0, seed=3, max_tokens=8)).outputs
    assert len(best) == 1
    assert best[0].token_ids == max(samples, key=lambda o: o.cumulative_logprob).token_ids


def test_async_client_generates_and_streams(services):
    import asyncio

    from pagedserve.common.client import AsyncClient

    async def main():
        async with AsyncClient(services.client, timeout=60.0) as client:
            params = SamplingParams(temperature=0.0, max_tokens=8)
            outs = await asyncio.gather(*(client.generate(x, params) for x in PROMPTS[:3]))
            deltas = [d async for d in client.stream(PROMPTS[0], params)]
            return outs, deltas

    outs, deltas = asyncio.run(main())
    assert outs[0].outputs[0].text == "".join(d.outputs[0].text for d in deltas)
    assert outs[0].outputs[0].text.startswith(" Paris")
    assert deltas[0].prompt_token_ids == [504, 3575, 282, 4649, 314]


def test_admin_shows_each_running_sequence_block_table(client, services):
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    stream = client.stream(PROMPTS[6], params, request_id="watched")
    next(stream)
    from services import admin

    seqs = admin(services.admin, "seqs")["seqs"]
    (seq,) = [s for s in seqs if s["request_id"] == "watched"]
    assert len(seq["block_table"]) == -(-seq["num_tokens"] // 16)
    assert len(set(seq["block_table"])) == len(seq["block_table"])
    client.abort("watched")
    list(stream)


def test_client_times_out_instead_of_hanging_when_nobody_answers():
    from pagedserve.common.client import ServerTimeoutError
    from services import free_ports

    (port,) = free_ports(1)
    with Client(f"tcp://127.0.0.1:{port}", timeout=1.0) as lonely:
        start = time.monotonic()
        with pytest.raises(ServerTimeoutError, match="is the scheduler running"):
            lonely.generate("hello", SamplingParams(max_tokens=2))
        assert time.monotonic() - start < 5


def test_shared_prefix_is_computed_once_and_output_is_unchanged(client, services, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prefix = [int(t) for t in client.generate("A long shared system prompt about the sea. " * 24,
                                              SamplingParams(max_tokens=1)).prompt_token_ids]
    assert len(prefix) >= 200
    first, second = prefix + [504, 3575, 282], prefix + [4649, 314]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    client.generate(first, params)
    before = services.pool()["prefix_cache"]
    out = client.generate(second, params).outputs[0].token_ids
    after = services.pool()["prefix_cache"]
    assert after["queries"] - before["queries"] == len(second)
    assert after["hits"] - before["hits"] == len(prefix) // 16 * 16  # every full prefix block
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(torch.tensor([second]), max_new_tokens=8, do_sample=False,
                                  min_new_tokens=8)[0, len(second):].tolist()
    assert out == expected


def test_every_device_block_is_free_at_the_end(services):  # keep last: runs after the others
    wait_for(lambda: services.pool()["device"]["used"] == 0)  # an abort frees at the next step
    pool = services.pool()
    assert {k: pool["device"][k] for k in ("total", "free", "used")} == {
        "total": 1024, "free": 1024, "used": 0}
    assert pool["device"]["shared"] == 0 and 0 < pool["device"]["cached"] <= 1024
    assert pool["running"] == pool["waiting"] == pool["swapped"] == 0


def test_beyond_max_waiting_new_requests_get_overloaded_and_the_rest_complete(smollm2_dir):
    from pagedserve.common.client import OverloadedError

    # No executor: nothing is admitted, so the queue only grows.
    client_port, executor_port, admin_port = free_ports(3)
    scheduler = pagedserve("scheduler", "--model", str(smollm2_dir), "--max-waiting", "3",
                           "--client-port", str(client_port), "--executor-port",
                           str(executor_port), "--admin-port", str(admin_port))
    try:
        with Client(f"tcp://127.0.0.1:{client_port}", timeout=30.0) as client:
            queued = [client.stream(PROMPTS[0], GREEDY, request_id=f"q{i}") for i in range(3)]
            readers = [threading.Thread(target=list, args=(stream,), daemon=True)
                       for stream in queued]
            for reader in readers:  # the first output (or heartbeat) proves it is queued
                reader.start()
            wait_for(lambda: admin(f"tcp://127.0.0.1:{admin_port}", "pool")["waiting"] == 3)
            with pytest.raises(OverloadedError, match="max_waiting 3"):
                client.generate(PROMPTS[1], GREEDY)
            for i in range(3):
                client.abort(f"q{i}")
            for reader in readers:  # each aborted stream ends, before the client closes
                reader.join(timeout=30)
                assert not reader.is_alive()
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=15)
