"""Crashes under ``pagedserve up``, with real processes and SIGKILL.

An executor killed mid-run is noticed within two seconds and restarted, and every request
completes with the greedy tokens of an undisturbed run. A killed scheduler is restarted too:
its clients get a typed, retriable error instead of hanging, and the executor registers with
the new scheduler by itself.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pagedserve.common.client import Client, RequestLostError
from pagedserve.common.sampling import SamplingParams
import services
from services import admin, child, wait_ready

pytestmark = pytest.mark.slow

PROMPTS = [f"Write a short story about a lighthouse keeper named Ana, part {i}."
           for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture
def up(smollm2_dir, tmp_path):
    with services.up(smollm2_dir, tmp_path / "up.log", "--kv-cache-gb", "1") as running:
        yield running


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_a_killed_executor_is_noticed_replaced_and_every_request_completes_exactly(up):
    with Client(up.client, timeout=120.0) as client:
        want = tokens(client.generate(PROMPTS, PARAMS))
        admin(up.admin, "reset_prefix_cache")  # the second run computes everything again
        rest = {}
        others = threading.Thread(
            target=lambda: rest.update(outputs=client.generate(PROMPTS[1:], PARAMS)))
        others.start()
        first, detected_s = [], None
        for delta in client.stream(PROMPTS[0], PARAMS):
            first += delta.outputs[0].token_ids
            if detected_s is None and len(first) >= 8:
                os.kill(child(up.proc.pid, "executor"), signal.SIGKILL)
                killed = time.monotonic()
                while admin(up.admin, "health")["status"] == "ready":
                    time.sleep(0.02)
                detected_s = time.monotonic() - killed
        others.join()
    print(f"executor loss detected in {detected_s:.2f} s")
    assert detected_s <= 2.0
    assert [first, *tokens(rest["outputs"])] == want
    health = admin(up.admin, "health")
    assert health["status"] == "ready" and health["executors_lost"] == 1
    assert admin(up.admin, "pool")["device"]["used"] == 0
    assert "the executor exited with code -9; restarting it" in up.log.read_text()


def test_a_killed_scheduler_fails_its_requests_retriably_and_the_executor_comes_back(up):
    with Client(up.client, timeout=60.0) as client:
        stream = client.stream(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4000,
                                                          ignore_eos=True))
        next(stream)
        os.kill(child(up.proc.pid, "scheduler"), signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(RequestLostError) as lost:
            for _ in stream:
                pass
        assert lost.value.retriable and time.monotonic() - killed < 20
        wait_ready(up.admin, [up.proc], timeout_s=60.0)  # the executor registered again
        out = client.generate("The capital of France is",
                              SamplingParams(temperature=0.0, max_tokens=6))
    assert out.outputs[0].text == " Paris.\n\nThe answer"
    assert "the scheduler exited with code -9; restarting it" in up.log.read_text()
