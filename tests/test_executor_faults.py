"""A step that fails after its plan was applied is an executor fault, never an invalid plan:
the executor drops what it mirrors and registers again, the scheduler recomputes, and the
request completes as if nothing had happened. Faults are real: the model's forward raises."""
from __future__ import annotations

import threading

import pytest
import torch

from pagedserve.common import protocol as p
from pagedserve.common.config import ExecutorConfig
from pagedserve.executor_svc.model_runner import ExecutorFault, PlanError
from pagedserve.executor_svc.service import ExecutorService
from pagedserve.executor_svc.worker import Worker
from executor_harness import BLOCK_SIZE, PROMPT, FakeScheduler, plan
from tiny_models import make_tiny_model


class FaultyForward:
    """Wraps ``model``'s forward so that its ``fail_at``-th call (from 1) raises ValueError,
    as a kernel rejecting its arguments mid-step would."""

    def __init__(self, model: torch.nn.Module, fail_at: int):
        self.forward, self.fail_at, self.calls = model.forward, fail_at, 0
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("injected: a kernel rejected its arguments")
        return self.forward(*args, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture
def worker(model_dir):
    worker = Worker(ExecutorConfig(model=str(model_dir), num_device_blocks=8,
                                   num_cpu_blocks=2))
    worker.start(p.ConfigureExecutor(block_size=BLOCK_SIZE, max_model_len=128,
                                     max_num_seqs=8, max_num_batched_tokens=64))
    return worker


def test_a_failure_inside_the_forward_pass_is_a_fault_after_the_plan_was_applied(worker):
    FaultyForward(worker.model, fail_at=1)
    with pytest.raises(ExecutorFault, match="step 0 failed after its plan was applied: "
                                            "ValueError: injected") as fault:
        worker.submit(p.encode(plan(0)))
    assert not isinstance(fault.value, (PlanError, ValueError))
    assert isinstance(fault.value.__cause__, ValueError)
    assert worker.runner.seqs[0].block_table == [0, 1]  # the plan had been applied


def test_only_plan_validation_answers_invalid_request_and_applies_nothing(worker):
    FaultyForward(worker.model, fail_at=1)
    unknown = plan(1, seq_id=3)  # seq 3 was never sent
    [reply] = worker.submit(p.encode(unknown))
    assert isinstance(reply, p.ErrorMsg) and reply.code == "invalid_request"
    assert "unknown seq id 3" in reply.message and worker.runner.seqs == {}
    bad_params = plan(0, new_seqs=[p.NewSeq(seq_id=0, token_ids=PROMPT, block_table=[0, 1],
                                            params={"stop": ["x"]})])
    [reply] = worker.submit(p.encode(bad_params))
    assert reply.code == "invalid_request" and "unknown sampler parameter(s): stop" in reply.message
    assert worker.runner.seqs == {}


def test_after_a_fault_the_executor_registers_again_and_serves_the_recomputed_sequence(
        model_dir):
    scheduler = FakeScheduler()
    service = ExecutorService(ExecutorConfig(model=str(model_dir), scheduler=scheduler.address,
                                             num_device_blocks=8, num_cpu_blocks=2))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    try:
        assert isinstance(scheduler.receive(), p.RegisterExecutor)
        assert isinstance(scheduler.configure(), p.ExecutorReady)
        scheduler.send(plan(0))
        first = scheduler.receive()
        assert isinstance(first, p.StepResult)
        faulty = FaultyForward(service.worker.model, fail_at=1)
        scheduler.send(plan(1))  # decodes the sampled token: the forward pass raises
        again = scheduler.receive()
        assert isinstance(again, p.RegisterExecutor), again  # not an invalid_request error
        identity = scheduler.executor
        assert isinstance(scheduler.configure(), p.ExecutorReady)
        assert service.worker.runner.seqs == {}  # it dropped what it mirrored
        # The scheduler recomputes: the prompt and the token sampled before the fault.
        recompute = [*PROMPT, int(first.token_ids[0])]
        scheduler.send(plan(2, new_seqs=[p.NewSeq(seq_id=0, token_ids=recompute,
                                                  block_table=[0, 1],
                                                  params={"temperature": 0.0})],
                            num_tokens=[len(recompute)]))
        result = scheduler.receive()
        assert isinstance(result, p.StepResult) and result.seq_ids.tolist() == [0]
        assert faulty.calls == 2 and scheduler.executor == identity
    finally:
        service.stop()
        thread.join(timeout=30)
        scheduler.ctx.destroy(linger=0)
    assert not thread.is_alive()


class Serving:
    """A real scheduler process and, in this process, an executor whose model ``wrap``
    wraps (to inject faults); ``client`` and ``admin`` are the scheduler's addresses."""

    def __init__(self, model_dir, wrap):
        from services import free_ports, pagedserve, wait_ready

        client_port, executor_port, admin_port = free_ports(3)
        self.client = f"tcp://127.0.0.1:{client_port}"
        self.admin = f"tcp://127.0.0.1:{admin_port}"
        self.scheduler = pagedserve("scheduler", "--model", str(model_dir), "--client-port",
                                    str(client_port), "--executor-port", str(executor_port),
                                    "--admin-port", str(admin_port))
        self.service = self.thread = None
        try:
            self.service = ExecutorService(ExecutorConfig(
                model=str(model_dir), scheduler=f"tcp://127.0.0.1:{executor_port}",
                num_device_blocks=64, num_cpu_blocks=8))
            self.wrapper = wrap(self.service.worker.model)
            self.thread = threading.Thread(target=self.service.serve_forever, daemon=True)
            self.thread.start()
            wait_ready(self.admin, [self.scheduler], timeout_s=120)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        from pagedserve.common.up import stop_processes

        if self.service is not None:
            self.service.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)
        stop_processes([self.scheduler])


@pytest.fixture
def serving(smollm2_dir):
    """``serving(wrap)``: a ``Serving`` over SmolLM2, closed after the test."""
    started: list[Serving] = []

    def start(wrap) -> Serving:
        started.append(Serving(smollm2_dir, wrap))
        return started[-1]

    yield start
    for one in started:
        one.close()


@pytest.mark.slow
def test_a_fault_mid_request_is_recovered_and_the_request_completes_exactly(serving):
    from pagedserve.common.client import Client
    from pagedserve.common.sampling import SamplingParams
    from services import admin

    # The prompt, 2 decodes, then the forward raises.
    server = serving(lambda model: FaultyForward(model, fail_at=4))
    with Client(server.client, timeout=120.0) as client:
        out = client.generate("The capital of France is",
                              SamplingParams(temperature=0.0, max_tokens=6))
    assert out.outputs[0].text == " Paris.\n\nThe answer"
    assert server.wrapper.calls > 4 and admin(server.admin, "health")["executors_lost"] == 1


class PoisonedForward:
    """Wraps ``model``'s forward so that every step whose input holds ``token`` raises, as a
    request that brings the executor down each time it runs would."""

    def __init__(self, model: torch.nn.Module, token: int):
        self.forward, self.token, self.faults = model.forward, token, 0
        model.forward = self

    def __call__(self, input_ids, *args, **kwargs):
        if bool((input_ids == self.token).any()):
            self.faults += 1
            raise ValueError("injected: this request's tokens bring the executor down")
        return self.forward(input_ids, *args, **kwargs)


@pytest.mark.slow
def test_a_request_that_faults_the_executor_every_time_fails_and_the_others_are_served(
        serving):
    from pagedserve.common.client import Client, ServerError
    from pagedserve.common.sampling import SamplingParams
    from pagedserve.scheduler_svc.service import MAX_EXECUTOR_LOSSES
    from services import admin

    server = serving(lambda model: PoisonedForward(model, token=12345))
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    with Client(server.client, timeout=120.0) as client:
        with pytest.raises(ServerError, match="not recomputed again"):
            client.generate([504, 3575, 12345, 282], greedy)
        out = client.generate("The capital of France is", greedy)
    assert out.outputs[0].text == " Paris.\n\nThe answer"
    assert server.wrapper.faults == MAX_EXECUTOR_LOSSES
    assert admin(server.admin, "health")["executors_lost"] == MAX_EXECUTOR_LOSSES
    assert server.thread.is_alive()  # the executor itself never gave up
