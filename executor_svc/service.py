"""The executor service: load the model, register with the scheduler, apply step plans.

Handshake: ``register`` (model shape) -> ``configure`` (block size and budgets, from the
scheduler) -> size the KV pool -> ``ready`` (block counts). Then every ``step`` plan is
answered by one ``result``, or by an ``invalid_request`` error when the plan fails validation
(nothing of it was applied).

Two parts do the work: the ``Worker`` (model, KV cache, model runner, tensor-parallel ranks)
and the ``SchedulerLink`` (socket, handshake, heartbeats); ``serve_forever`` wires them. Each
registration ends when the scheduler is lost, the service stops, or a step fails after its
plan was applied (an ``ExecutorFault``). A fault is not the plan's fault: the executor drops
everything it mirrors and registers again, and the scheduler, seeing it come back, recomputes
every sequence it held, so no request is lost. A tensor-parallel group cannot tell whether
its ranks still agree after one, so there a fault ends the process (its supervisor restarts
it: ``pagedserve up``, compose), as it does after ``MAX_FAULTS_IN_A_ROW`` faults with no step
answered between them.
"""
from __future__ import annotations

import threading
import time

from pagedserve.common import protocol as p
from pagedserve.common.config import ExecutorConfig
from pagedserve.common.heap import freeze_startup_heap
from pagedserve.common.log import get_logger
from pagedserve.executor_svc.model_runner import ExecutorFault
from pagedserve.executor_svc.scheduler_link import SchedulerLink
from pagedserve.executor_svc.worker import Worker

log = get_logger("executor")
IDLE_TRIM_S = 1.0
POLL_MS = 200
MAX_FAULTS_IN_A_ROW = 3


class ExecutorService:
    """One executor process: its worker and, on the rank that talks to the scheduler, the
    link to it."""

    def __init__(self, config: ExecutorConfig):
        self.worker = Worker(config)
        self._stopping = threading.Event()
        self.link = SchedulerLink(config, self._stopping) if self.worker.is_driver else None
        self._faults = 0  # in a row: reset by each step answered

    def stop(self) -> None:
        self._stopping.set()

    def serve_forever(self) -> None:
        if self.link is None:
            self.worker.follow()
            return
        healthy = False  # the group, if any, can still hear a stop
        # The model is loaded. Collecting holds the GIL, so the heartbeat thread too: before
        # registering, where silence does not count yet.
        freeze_startup_heap()
        try:
            while (configure := self.link.register(self.worker.registration())) is not None:
                self._serve(configure)
            healthy = True
        finally:
            self._stopping.set()
            if healthy:
                self.worker.close()
            self.link.close()
            log.info("executor stopped")

    def _serve(self, configure: p.ConfigureExecutor) -> None:
        """One registration: set up, answer plans until it ends, drop everything."""
        self.link.send(self.worker.start(configure))
        try:
            with self.link.registered():
                self._answer_plans()
        except ExecutorFault:
            self._faults += 1
            log.exception("executor fault: dropping every sequence, registering again (the "
                          "scheduler recomputes them)", faults_in_a_row=self._faults)
            if self.worker.tp is not None or self._faults >= MAX_FAULTS_IN_A_ROW:
                raise
        if self.link.lost:
            log.warning("lost the scheduler: dropping every sequence, registering again")
        self.worker.drop()

    def _answer_plans(self) -> None:
        """Answer every plan until the service stops or the scheduler is lost; idle, hand
        back the memory the steps kept. While a step is in flight (``Worker.overlaps``), a
        plan that arrives before the device is done with it is launched ahead of it; the
        loop polls the socket and the device in turn until one of them is ready."""
        idle_since, trimmed = time.monotonic(), True
        while not self._stopping.is_set() and not self.link.lost:
            in_flight = self.worker.steps.in_flight
            payload = self.link.receive(POLL_MS if in_flight is None else 0)
            if payload is not None:
                replies = self.worker.submit(payload)
            elif in_flight is not None:
                if not in_flight.done():
                    continue  # the device is busy: wait for it, or for the next plan
                replies = self.worker.flush()
            else:
                if not trimmed and time.monotonic() - idle_since > IDLE_TRIM_S:
                    self.worker.trim()
                    trimmed = True
                continue
            for reply in replies:
                self.link.send(reply)
                if isinstance(reply, p.StepResult):
                    self._faults = 0
            idle_since, trimmed = time.monotonic(), False
