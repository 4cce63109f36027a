"""The scheduler service: its parts, wired by one poll loop on one thread.

- ``ClientLink``: the client socket, request intake, client liveness;
- ``ExecutorLink``: the executor's handshake, heartbeats, plans in flight and loss; a ready
  executor's ``ExecutorSession`` is attached to the scheduler, and detached when it is lost;
- ``StepLoop``: the engine's steps, sent ahead of the result when they can be;
- ``AdminHandler``: read-only views on the admin socket.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import zmq

from pagedserve.common import protocol as p
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.heap import freeze_startup_heap
from pagedserve.common.log import get_logger
from pagedserve.scheduler_svc.admin import AdminHandler, Health
from pagedserve.scheduler_svc.client_link import ClientLink
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.executor_link import ExecutorLink, InFlight
from pagedserve.scheduler_svc.frontend import Frontend
from pagedserve.scheduler_svc.generation_config import sampling_defaults
from pagedserve.scheduler_svc.metrics import Metrics
from pagedserve.scheduler_svc.model_card import ModelCard
from pagedserve.scheduler_svc.output_processor import OutputProcessor
from pagedserve.scheduler_svc.scheduled_step import ScheduledStep
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession
from pagedserve.scheduler_svc.sockets import Sockets, drain
from pagedserve.scheduler_svc.step_loop import StepLoop
from pagedserve.scheduler_svc.tokenizer import Tokenizer

log = get_logger("scheduler")
IDLE_POLL_MS = 100
# Client heartbeats (every CLIENT_HEARTBEAT_S) and timeouts need no finer clock than this.
HOUSEKEEPING_S = 0.05
# A request held at this many executor losses fails instead of being recomputed once more: it
# may be what brings the executor down (a fault on its tokens, every time), and recomputing it
# forever would stop everyone else from being served. Below the executor's own limit of faults
# in a row, so that the executor is still there to serve the others.
MAX_EXECUTOR_LOSSES = 2


def read_model_limits(model_dir: Path) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) from the model's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: is it an HF model directory? "
                                f"(pagedserve prepare-model creates the default one)")
    config = json.loads(path.read_text())
    return int(config["vocab_size"]), int(config.get("max_position_embeddings", 2048))


class SchedulerService:
    """``pagedserve scheduler``: binds its sockets on construction; ``serve_forever`` runs
    the loop until ``stop``."""

    def __init__(self, config: SchedulerConfig):
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be "
                             f"at least max_num_seqs ({config.max_num_seqs}): every running "
                             f"sequence decodes a token each step")
        self.config = config
        model_dir = config.model_dir()
        tokenizer = Tokenizer.from_model_dir(model_dir)
        vocab_size, max_positions = read_model_limits(model_dir)
        self.model_card = ModelCard.read(model_dir, tokenizer, vocab_size, config.chat_template)
        self.model_limit = ContextLimit(min(config.max_model_len or max_positions, max_positions),
                                        "the model serves no more")
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens,
                                   config.preemption_mode)
        self.engine = Engine(self.scheduler, OutputProcessor(tokenizer, self.max_model_len))
        self.metrics = Metrics(model_dir.name)
        self.sockets = Sockets(config, self.metrics.prometheus)
        frontend = Frontend(tokenizer, vocab_size, self.max_model_len, config.max_num_seqs,
                            sampling_defaults(model_dir))
        self.clients = ClientLink(self.sockets.clients, frontend, self.engine, config,
                                  self.model_info)
        self.executor = ExecutorLink(
            self.sockets.executor, config, vocab_size, self.model_limit,
            on_ready=self._on_ready, on_result=self._on_result, on_rejected=self._on_rejected,
            on_lost=self._on_lost)
        self.steps = StepLoop(self.engine, self.executor, self.clients, self.metrics,
                              config.async_scheduling)
        self.admin = AdminHandler(self.scheduler, self.metrics, self.health, config.block_size)
        self._next_status = time.monotonic() + config.log_stats_interval
        self._busy_since_status = False
        self._next_housekeeping = 0.0
        self._stopped = False

    def max_model_len(self) -> int:
        """The longest context served now: the model's (or ``--max-model-len``), lowered to
        what the ready executor serves."""
        session = self.scheduler.session
        return (self.model_limit if session is None else session.limit).max_model_len

    def model_info(self, request_id: str) -> p.ModelInfo:
        """The served model, as a client asks for it (``ModelInfoRequest``)."""
        return self.model_card.info(request_id, self.max_model_len(), self.scheduler.ready)

    def health(self) -> Health:
        return Health(executor=self.executor.describe(), executors_lost=self.executor.num_lost,
                      live_requests=self.clients.num_live_requests,
                      max_model_len=self.max_model_len())

    def stop(self) -> None:
        self._stopped = True

    def serve_forever(self) -> None:
        config, sockets = self.config, self.sockets
        log.info("scheduler listening", client=config.client_port,
                 executor=config.executor_port, admin=config.admin_port,
                 max_model_len=self.max_model_len())
        poller = zmq.Poller()
        for sock in (sockets.clients, sockets.executor, sockets.admin):
            poller.register(sock, zmq.POLLIN)
        freeze_startup_heap()
        try:
            while not self._stopped:
                events = dict(poller.poll(0 if self.steps.can_step() else IDLE_POLL_MS))
                if events:
                    self.steps.wake()
                if sockets.clients in events:
                    drain(sockets.clients, self.clients.on_message)
                if sockets.executor in events:
                    drain(sockets.executor, self.executor.on_message)
                if sockets.admin in events:
                    self.metrics.refresh(self.scheduler)  # the views read the queues as they are
                    sockets.admin.send(self.admin.handle(sockets.admin.recv()))
                self.executor.check()
                if self.steps.can_step():
                    self.steps.step()
                self._housekeeping()
                self._log_status()
        finally:
            sockets.close()
            log.info("scheduler stopped")

    def _housekeeping(self) -> None:
        """Client heartbeats and timeouts, and the metrics' snapshot (Prometheus reads it):
        each walks every request or queue, and the loop turns more than once a step, so at
        most every ``HOUSEKEEPING_S``."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_S
        self.clients.keep_alive()
        self.metrics.refresh(self.scheduler)

    def _log_status(self) -> None:
        """Every ``log_stats_interval`` seconds while there is or was work, one status line."""
        interval = self.config.log_stats_interval
        self._busy_since_status |= self.scheduler.has_work
        now = time.monotonic()
        if not interval or now < self._next_status:
            return
        if self._busy_since_status:
            log.info("status", **self.metrics.status(interval, now))
        self._busy_since_status = False
        self._next_status = now + interval

    # ------------------------------------------------------------ executor events

    def _on_ready(self, session: ExecutorSession) -> None:
        self.scheduler.attach(session)
        self.clients.fail_longer_than(session.limit)

    def _on_result(self, entry: InFlight, result: p.StepResult) -> None:
        self.steps.on_result(entry, result)

    def _on_rejected(self, steps: list[ScheduledStep], error: p.ErrorMsg) -> None:
        requests = {seq.request.key: seq.request for step in steps for seq in step.seqs}
        for request in requests.values():
            self.clients.fail(request, p.ErrorMsg(
                code="internal", request_id=request.request_id,
                message=f"the executor rejected a step: {error.message}"))

    def _on_lost(self, why: str) -> None:
        requeued = self.scheduler.detach()
        self.steps.wake()
        log.error("executor lost: waiting for one to register", reason=why,
                  sequences_to_recompute=len(requeued))
        for request in {seq.request.key: seq.request for seq in requeued}.values():
            if request.num_executor_losses >= MAX_EXECUTOR_LOSSES:
                log.error("request failed: held at every executor loss",
                          request_id=request.request_id, losses=request.num_executor_losses)
                self.clients.fail(request, p.ErrorMsg(
                    code="internal", request_id=request.request_id,
                    message=f"the executor was lost {request.num_executor_losses} times while "
                            f"it held this request (last: {why}); it is not recomputed again"))
