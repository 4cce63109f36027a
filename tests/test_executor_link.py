"""The executor link over in-process sockets: the handshake opens a session, a silent or
re-registering executor is lost, and results are matched to the plans in flight."""
import time
import uuid

import pytest
import zmq

from pagedserve.common import protocol as p
from pagedserve.common.config import SchedulerConfig
from pagedserve.scheduler_svc.executor_link import ExecutorLink, InFlight
from pagedserve.scheduler_svc.scheduled_step import ScheduledStep
from pagedserve.scheduler_svc.session import ContextLimit
from pagedserve.scheduler_svc.sockets import drain


class Harness:
    """A link on a ROUTER and an executor's DEALER, with every event the link reports."""

    def __init__(self):
        ctx = zmq.Context.instance()
        address = f"inproc://link-{uuid.uuid4().hex}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.bind(address)
        self.executor = ctx.socket(zmq.DEALER)
        self.executor.setsockopt(zmq.IDENTITY, b"executor-1")
        self.executor.connect(address)
        self.events = []
        config = SchedulerConfig(block_size=4, watermark=0.0, executor_timeout=0.2)
        self.link = ExecutorLink(
            self.router, config, vocab_size=100,
            limit=ContextLimit(8192, "the model serves no more"),
            on_ready=lambda session: self.events.append(("ready", session)),
            on_result=lambda entry, result: self.events.append(("result", entry.step_no)),
            on_rejected=lambda steps, error: self.events.append(("rejected", len(steps))),
            on_lost=lambda why: self.events.append(("lost", why)))

    def send(self, msg) -> None:
        self.executor.send(p.encode(msg))
        assert self.router.poll(2000)
        drain(self.router, self.link.on_message)

    def reply(self):
        assert self.executor.poll(2000)
        return p.decode(self.executor.recv())

    def close(self) -> None:
        self.executor.close(linger=0)
        self.router.close(linger=0)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def register(harness, max_model_len=64):
    harness.send(p.RegisterExecutor(model="m", architecture="LlamaForCausalLM", vocab_size=100,
                                    max_model_len=max_model_len, dtype="float32",
                                    device="cpu", kv_bytes_per_token=64))
    return harness.reply()


def test_the_handshake_agrees_the_context_and_opens_one_session_when_ready(harness):
    configure = register(harness, max_model_len=64)
    assert isinstance(configure, p.ConfigureExecutor)
    assert configure.block_size == 4 and configure.max_model_len == 64
    assert harness.link.describe() == {"model": "m", "dtype": "float32", "device": "cpu",
                                       "kernels": {}}  # none chosen before it is ready
    kernels = {"attention": "cpu", "cpu": "AMD EPYC: avx2 fma"}
    harness.send(p.ExecutorReady(num_device_blocks=8, num_cpu_blocks=4, kernels=kernels))
    harness.send(p.ExecutorReady(num_device_blocks=8, num_cpu_blocks=4))  # ignored
    (kind, session), = harness.events
    assert kind == "ready" and session.max_model_len == 32  # 8 blocks of 4 tokens
    assert harness.link.describe() == {"model": "m", "dtype": "float32", "device": "cpu",
                                       "kernels": kernels}


def test_a_silent_or_re_registering_executor_is_lost_with_its_plans_in_flight(harness):
    register(harness)
    harness.send(p.ExecutorReady(num_device_blocks=8, num_cpu_blocks=4))
    plan = p.StepPlan(step=1, removed=[], new_seqs=[], seq_ids=[], num_tokens=[],
                      block_appends=[])
    harness.link.send(InFlight(ScheduledStep(), 1, 0.0), plan)
    register(harness)  # it restarted: whatever it held is gone
    assert harness.events[-1] == ("lost", "it registered again")
    assert not harness.link.in_flight and harness.link.num_lost == 1
    time.sleep(0.3)
    harness.link.check()
    assert harness.events[-1][0] == "lost" and harness.events[-1][1].startswith("silent for")
    assert harness.link.identity is None and harness.link.describe() is None
    assert harness.link.num_lost == 2


def test_results_are_matched_to_the_oldest_plan_in_flight(harness):
    register(harness)
    for step_no in (1, 2):
        plan = p.StepPlan(step=step_no, removed=[], new_seqs=[], seq_ids=[], num_tokens=[],
                          block_appends=[])
        harness.link.send(InFlight(ScheduledStep(), step_no, 0.0), plan)
        assert harness.reply().step == step_no
    result = dict(seq_ids=[], token_ids=[], logprobs=[], execute_ms=0.0, forward_ms=0.0,
                  block_ops_ms=0.0)
    harness.send(p.StepResult(step=2, **result))  # not the oldest: ignored
    harness.send(p.StepResult(step=1, **result))
    assert harness.events == [("result", 1)] and len(harness.link.in_flight) == 1
    harness.send(p.ErrorMsg(code="invalid_request", message="bad plan"))
    assert harness.events[-1] == ("rejected", 1) and not harness.link.in_flight
