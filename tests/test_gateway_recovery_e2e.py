"""The gateway under ``pagedserve up`` when a service dies (real processes, SIGKILL): a
non-streamed request outlives a scheduler restart with the answer of an undisturbed run,
and ``/health`` says 503 from the moment the executor is lost until it is replaced."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

import services
from services import admin, child

pytestmark = pytest.mark.slow

BODY = {"prompt": "Write a short story about a lighthouse keeper named Ana.",
        "max_tokens": 120, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def up(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("up") / "up.log"
    with services.up(smollm2_dir, log, "--kv-cache-gb", "1") as running:
        yield running


def complete(up) -> httpx.Response:
    return httpx.post(f"{up.http}/v1/completions", json=BODY, timeout=300)


def test_a_non_streamed_request_survives_a_scheduler_restart(up):
    undisturbed = complete(up).json()
    want, prompt_tokens = undisturbed["choices"][0]["text"], undisturbed["usage"]["prompt_tokens"]
    admin(up.admin, "reset_prefix_cache")  # the second run computes everything again
    result = {}
    request = threading.Thread(target=lambda: result.update(response=complete(up)))
    request.start()
    deadline = time.monotonic() + 60
    # killed mid-generation: 10 of its 120 tokens out
    while not any(s["num_tokens"] >= prompt_tokens + 10 for s in admin(up.admin, "seqs")["seqs"]):
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.05)
    os.kill(child(up.proc.pid, "scheduler"), signal.SIGKILL)
    request.join(timeout=280)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == want
    assert "submitting it again" in up.log.read_text()


def test_health_is_503_once_the_executor_is_lost_until_it_is_replaced(up):
    assert httpx.get(f"{up.http}/health").status_code == 200
    os.kill(child(up.proc.pid, "executor"), signal.SIGKILL)
    killed = time.monotonic()
    while httpx.get(f"{up.http}/health").status_code == 200:
        assert time.monotonic() - killed < 5, "the gateway still says healthy"
        time.sleep(0.05)
    print(f"/health said 503 {time.monotonic() - killed:.2f} s after the executor died")
    refused = httpx.post(f"{up.http}/v1/completions", json=BODY, timeout=30)
    assert refused.status_code == 503
    deadline = time.monotonic() + 180
    while httpx.get(f"{up.http}/health").status_code != 200:
        assert time.monotonic() < deadline, "no executor came back"
        time.sleep(0.5)
    assert complete(up).status_code == 200
