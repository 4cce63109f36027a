"""Overlapping steps in the executor service (``--overlap-steps``): a plan that arrives while
the step before it is still on the device is launched ahead of it, its input the token that
step leaves on the device; results and errors still answer the plans in their order. On a
CPU the device is never busy, so a slow device is imitated: a step counts as done only half
a second after its plan arrived."""
from __future__ import annotations

import threading
import time

import pytest

from pagedserve.common import protocol as p
from pagedserve.common.config import ExecutorConfig
from pagedserve.executor_svc.model_runner import Launched
from pagedserve.executor_svc.service import ExecutorService
from pagedserve.executor_svc.worker import Worker
from executor_harness import BLOCK_SIZE, FakeScheduler, plan
from tiny_models import make_tiny_model

BUSY_S = 0.5  # how long the imitated device works on a step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture
def slow_device(monkeypatch):
    monkeypatch.setattr(Launched, "done", lambda self: time.perf_counter() - self.start > BUSY_S)


@pytest.fixture
def executor(model_dir, slow_device):
    """A FakeScheduler and an executor service with overlapping steps, registered."""
    scheduler = FakeScheduler()
    service = ExecutorService(ExecutorConfig(model=str(model_dir), scheduler=scheduler.address,
                                             num_device_blocks=8, num_cpu_blocks=2,
                                             overlap_steps="on"))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    try:
        assert isinstance(scheduler.receive(), p.RegisterExecutor)
        ready = scheduler.configure()
        assert ready.kernels["overlap_steps"] == "on"
        yield scheduler, service
    finally:
        service.stop()
        thread.join(timeout=30)
        scheduler.ctx.destroy(linger=0)
    assert not thread.is_alive()


def one_by_one(model_dir, plans) -> list[list[int]]:
    """Each plan's sampled tokens, each step finished before the next is sent."""
    worker = Worker(ExecutorConfig(model=str(model_dir), num_device_blocks=8, num_cpu_blocks=2))
    worker.start(p.ConfigureExecutor(block_size=BLOCK_SIZE, max_model_len=128, max_num_seqs=8,
                                     max_num_batched_tokens=64))
    assert not worker.overlaps  # auto: off on a CPU
    return [result.token_ids.tolist() for plan in plans for result in worker.submit(p.encode(plan))]


def test_a_plan_sent_ahead_is_launched_before_the_step_in_flight_finishes(model_dir, executor):
    scheduler, service = executor
    # the prompt, then three decodes sent before any result: each computes the token the
    # step before it samples, which only the executor's device holds yet (the third needs a
    # new block)
    plans = [plan(0), plan(1), plan(2, block_appends=[0, 2]), plan(3)]
    for each in plans:
        scheduler.send(each)
    results = [scheduler.receive() for _ in plans]
    assert [r.step for r in results] == [0, 1, 2, 3]
    assert [r.token_ids.tolist() for r in results] == one_by_one(model_dir, plans)
    assert service.worker.steps.launched_ahead == 3
    # the mirror holds the tokens themselves, not the placeholders they were in flight
    mirrored = service.worker.runner.seqs[0].token_ids
    assert mirrored[-4:] == [r.token_ids[0] for r in results]


def test_a_plan_rejected_while_a_step_is_in_flight_is_answered_after_it(executor):
    scheduler, service = executor
    scheduler.send(plan(0))
    scheduler.send(plan(1, seq_id=3))  # seq 3 was never sent
    first, error = scheduler.receive(), scheduler.receive()
    assert isinstance(first, p.StepResult) and first.step == 0
    assert isinstance(error, p.ErrorMsg) and "unknown seq id 3" in error.message
    scheduler.send(plan(1))  # the executor serves on, the rejected plan never applied
    assert scheduler.receive().step == 1
    assert service.worker.steps.launched_ahead == 0
