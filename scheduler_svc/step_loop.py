"""The step loop: the engine's steps, sent to the executor and their results processed.

With no step in flight the next one is scheduled in full: admission, preemption, swaps,
beams. While one is in flight, the step after it is built and sent if it is a pure
continuation of it (async scheduling, ``Scheduler.schedule_ahead``), so that the executor
finds its next plan waiting instead of idling through the round trip and our processing.
The executor runs plans in order, one at a time.
"""
from __future__ import annotations

import time

import structlog

from pagedserve.common import protocol as p
from pagedserve.common.log import get_logger
from pagedserve.scheduler_svc.client_link import ClientLink
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.executor_link import ExecutorLink, InFlight
from pagedserve.scheduler_svc.metrics import Metrics

log = get_logger("scheduler")


class StepLoop:
    """Schedules steps onto ``executor`` when one is due (``can_step``), and hands their
    results' output to ``clients``."""

    def __init__(self, engine: Engine, executor: ExecutorLink, clients: ClientLink,
                 metrics: Metrics, async_scheduling: bool):
        self.engine = engine
        self.executor = executor
        self.clients = clients
        self.metrics = metrics
        self.async_scheduling = async_scheduling
        self._idle = False  # the last schedule() had nothing to send: wait for an event
        self._ahead_tried = False  # schedule_ahead ran since the last result
        self._last_result = 0.0  # perf_counter when the last result was processed

    def wake(self) -> None:
        """Something happened (a message, a lost executor): a step may fit now."""
        self._idle = False

    def can_step(self) -> bool:
        scheduler, in_flight = self.engine.scheduler, self.executor.in_flight
        if not scheduler.ready or not scheduler.has_work:
            return False
        if not in_flight:
            return not self._idle
        return len(in_flight) == 1 and self.async_scheduling and not self._ahead_tried

    def step(self) -> None:
        """Schedule the next step and send it: in full, or ahead of the one in flight."""
        started = time.perf_counter()
        if self.executor.in_flight:
            self._ahead_tried = True  # nothing it depends on changes before the result
            scheduled = self.engine.schedule_ahead(self.executor.in_flight[0].step)
            if scheduled is None:
                return
        else:
            scheduled = self.engine.schedule()
            for request in self.engine.take_capped():
                log.warning("request ended: its sequences outgrew the KV pool",
                            request_id=request.request_id)
                self.clients.send_output(request)
            if scheduled is None:
                self._idle = True  # nothing fits until something changes: wait for an event
                return
        step, plan = scheduled
        # Every log line from here on, about a request or not, names the step.
        structlog.contextvars.bind_contextvars(step=plan.step)
        self.executor.send(InFlight(step, plan.step, started), plan)

    def on_result(self, entry: InFlight, result: p.StepResult) -> None:
        """Process the result of the oldest step in flight and send its output."""
        step, _, started = entry
        self._ahead_tried = False
        requests = self.engine.process(step, result)
        self.metrics.observe(requests, time.monotonic())
        self.clients.send_outputs(requests)
        # A step sent ahead began to occupy the loop only when the one before it ended.
        now = time.perf_counter()
        began, self._last_result = max(started, self._last_result), now
        self.metrics.observe_step((now - began) * 1e3, result.forward_ms, len(step.seqs),
                                  ahead=started < began)
