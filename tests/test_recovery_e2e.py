"""Crashes under ``pagedserve up``, with real processes and SIGKILL.

An executor killed mid-run is noticed within two seconds and restarted, and every request
completes with the greedy tokens of an undisturbed run. A killed scheduler is restarted too:
its clients get a typed, retriable error instead of hanging, and the executor registers with
the new scheduler by itself.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.client import Client, RequestLostError
from common.sampling import SamplingParams
from services import admin, free_ports, pagedserve, wait_ready

pytestmark = pytest.mark.slow

PROMPTS = [f"Write a short story about a lighthouse keeper named Ana, part {i}."
           for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture
def up(smollm2_dir, tmp_path):
    client, executor, admin_port = free_ports(3)
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        proc = pagedserve("up", "--model", str(smollm2_dir), "--client-port", str(client),
                          "--executor-port", str(executor), "--admin-port", str(admin_port),
                          "--kv-cache-gb", "1", stdout=log, stderr=subprocess.STDOUT)
    services = SimpleNamespace(proc=proc, client=f"tcp://127.0.0.1:{client}",
                               admin=f"tcp://127.0.0.1:{admin_port}", log=log_path)
    try:
        wait_ready(services.admin, [proc])
        # up itself polls for readiness: until it says so, a service exiting is a failed start
        deadline = time.monotonic() + 30
        while "pagedserve ready" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield services
    finally:
        print(log_path.read_text()[-8000:])  # shown by pytest when the test fails
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child(parent: int, role: str) -> int:
    """The pid of ``parent``'s child process running ``pagedserve ROLE``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and role.encode() in argv:
            return int(entry.name)
    raise LookupError(f"no {role} under process {parent}")


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
