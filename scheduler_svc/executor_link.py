"""The executor link: the registration handshake, heartbeats, plans in flight, and loss.

One executor at a time. It registers (model shape, limits), is told the block size and the
context limit, sizes its KV pools and reports them: then it is ready, and the link opens its
session. It sends a heartbeat every 0.25 s from a thread of its own, even mid-step; silent for
``executor_timeout`` (or registering anew), it is taken for dead with every block it held, and
the scheduler serves on once an executor registers again. No request is lost meanwhile.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import zmq

from pagedserve.common import protocol as p
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.log import get_logger
from pagedserve.scheduler_svc.scheduled_step import ScheduledStep
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession
from pagedserve.scheduler_svc.sockets import drain

log = get_logger("scheduler")


class InFlight(NamedTuple):
    step: ScheduledStep
    step_no: int
    started: float  # perf_counter when it began to be scheduled


class ExecutorLink:
    """The executor socket's peer. Events go to the callbacks: ``on_ready(session)``,
    ``on_result(in_flight, result)`` in step order, ``on_rejected(steps, error)`` (the
    executor refused the oldest plan in flight) and ``on_lost(why)``."""

    def __init__(self, sock: zmq.Socket, config: SchedulerConfig, vocab_size: int,
                 limit: ContextLimit, *, on_ready: Callable[[ExecutorSession], None],
                 on_result: Callable[[InFlight, p.StepResult], None],
                 on_rejected: Callable[[list[ScheduledStep], p.ErrorMsg], None],
                 on_lost: Callable[[str], None]):
        self.sock = sock
        self.config = config
        self.vocab_size = vocab_size
        self.limit = limit  # the model's own: each executor may lower it for its session
        self.on_ready, self.on_result = on_ready, on_result
        self.on_rejected, self.on_lost = on_rejected, on_lost
        self.identity: bytes | None = None
        self.info: p.RegisterExecutor | None = None
        self.kernels: dict[str, str] = {}  # what the ready executor computes with, per op
        self.num_lost = 0
        self.in_flight: deque[InFlight] = deque()  # oldest first; two at most
        self._heard = 0.0  # monotonic time of the registered executor's last word
        # The context agreed at registration, until the executor reports ready.
        self._pending: ContextLimit | None = None

    def describe(self) -> dict | None:
        """The registered executor's model, dtype and device, and once it is ready the
        kernels it chose (with its processor, on a CPU); None before one registers."""
        info = self.info
        return None if info is None else {"model": info.model, "dtype": info.dtype,
                                           "device": info.device, "kernels": self.kernels}

    def send(self, entry: InFlight, plan: p.StepPlan) -> None:
        self.in_flight.append(entry)
        self.sock.send_multipart([self.identity, p.encode(plan)])

    def on_message(self, identity: bytes, payload: bytes) -> None:
        if identity.endswith(p.HEARTBEAT_SUFFIX):
            self._on_heartbeat(identity, payload)
            return
        try:
            msg = p.decode(payload, (p.RegisterExecutor, p.ExecutorReady, p.StepResult,
                                     p.ErrorMsg))
        except p.ProtocolError as exc:
            log.error("bad message from executor", error=str(exc))
            self._reply(identity, p.ErrorMsg(code="protocol_error", message=str(exc)))
            return
        if identity == self.identity:
            self._heard = time.monotonic()
        if isinstance(msg, p.RegisterExecutor):
            self._on_register(identity, msg)
        elif identity != self.identity:
            log.warning("message from an unregistered executor ignored", type=msg.TYPE)
        elif isinstance(msg, p.ExecutorReady):
            self._on_ready(msg)
        elif isinstance(msg, p.StepResult):
            self._on_result(msg)
        else:
            self._on_error(msg)

    def check(self) -> None:
        """Take the registered executor for dead once it is silent for ``executor_timeout``."""
        timeout = self.config.executor_timeout
        if self.identity is None or time.monotonic() - self._heard <= timeout:
            return
        # A long turn of the loop may have left its heartbeats unread: read them first.
        drain(self.sock, self.on_message)
        silent = time.monotonic() - self._heard
        if self.identity is not None and silent > timeout:
            self._lost(f"silent for {silent:.1f} s")

    def _reply(self, identity: bytes, msg) -> None:
        self.sock.send_multipart([identity, p.encode(msg)])

    def _on_register(self, identity: bytes, msg: p.RegisterExecutor) -> None:
        if self.identity is not None and identity != self.identity:
            self._reply(identity, p.ErrorMsg(code="unavailable",
                                             message="another executor is registered; retry"))
            return
        if identity == self.identity:  # it restarted, or lost us: nothing it held is left
            self._lost("it registered again")
        if msg.vocab_size < self.vocab_size:
            self._reply(identity, p.ErrorMsg(
                code="invalid_request", message=f"executor model has vocab_size "
                f"{msg.vocab_size}, the scheduler's model {self.vocab_size}"))
            return
        self.identity, self.info = identity, msg
        self._heard = time.monotonic()
        log.info("executor registered", model=msg.model, dtype=msg.dtype, device=msg.device)
        self._pending = self.limit.lower(msg.max_model_len, "the executor's model serves no more")
        config = self.config
        self._reply(identity, p.ConfigureExecutor(
            block_size=config.block_size, max_model_len=self._pending.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens))

    def _on_ready(self, msg: p.ExecutorReady) -> None:
        if self._pending is None:
            log.error("executor reported ready twice: ignored")
            return
        session = ExecutorSession.open(self.config, self.info, msg, self._pending)
        self._pending = None
        self.kernels = dict(msg.kernels)
        log.info("executor ready", device_blocks=msg.num_device_blocks,
                 cpu_blocks=msg.num_cpu_blocks, block_size=self.config.block_size,
                 **self.kernels)
        self.on_ready(session)

    def _on_heartbeat(self, identity: bytes, payload: bytes) -> None:
        """Answered for the registered executor only: an executor that hears nothing back
        registers again (after a scheduler restart, or after being taken for dead)."""
        if self.identity is None or identity != self.identity + p.HEARTBEAT_SUFFIX:
            return
        try:
            p.decode(payload, (p.Heartbeat,))
        except p.ProtocolError as exc:
            log.error("bad heartbeat from executor", error=str(exc))
            return
        self._heard = time.monotonic()
        self._reply(identity, p.Heartbeat())

    def _on_result(self, result: p.StepResult) -> None:
        if not self.in_flight or result.step != self.in_flight[0].step_no:
            log.error("result for an unexpected step ignored", step=result.step)
            return
        self.on_result(self.in_flight.popleft(), result)

    def _on_error(self, msg: p.ErrorMsg) -> None:
        """The executor rejected the oldest plan in flight: a scheduler bug, so its requests
        (and those of the plan sent after it, which assumed it) fail loudly rather than the
        same plan being retried forever."""
        log.error("executor rejected a plan", code=msg.code, message=msg.message)
        steps = [entry.step for entry in self.in_flight]
        self.in_flight.clear()
        self.on_rejected(steps, msg)

    def _lost(self, why: str) -> None:
        """Forget the executor and everything it held; its sequences wait to be recomputed
        by the next one that registers (``pagedserve up`` and compose restart it)."""
        self.identity = self.info = None
        self.kernels = {}
        self.in_flight.clear()  # their results will never come: their tokens are recomputed
        self.num_lost += 1
        self.on_lost(why)
