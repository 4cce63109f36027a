"""The scheduler service: client, executor and admin sockets around the step loop.

One thread, one poller. With no step in flight the next one is scheduled in full: admission,
preemption, swaps, beams. While one is in flight, the step after it is built and sent if it
is a pure continuation of it (async scheduling, ``Scheduler.schedule_ahead``), so that the
executor finds its next plan waiting instead of idling through the round trip and our
processing. The executor runs plans in order, one at a time.

The executor sends a heartbeat every 0.25 s from a thread of its own, even mid-step. Silent for
``executor_timeout`` (or registering anew), it is taken for dead with every block it held:
its sequences wait to be recomputed, and the scheduler serves on once an executor registers
again. No request is lost while the scheduler lives.
"""
from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import structlog
import zmq

from pagedserve.common import protocol as p
from pagedserve.common.auth import SchedulerAuth
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.log import get_logger
from pagedserve.scheduler_svc.admin import AdminHandler
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.cost_model import PreemptionCostModel
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.frontend import Frontend, InvalidRequest
from pagedserve.scheduler_svc.metrics import Metrics
from pagedserve.scheduler_svc.output_processor import OutputProcessor
from pagedserve.scheduler_svc.scheduler import ScheduledStep, Scheduler
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.tokenizer import Tokenizer

log = get_logger("scheduler")
IDLE_POLL_MS = 100


class InFlight(NamedTuple):
    step: ScheduledStep
    step_no: int
    started: float  # perf_counter when it began to be scheduled


def read_model_limits(model_dir: Path) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) from the model's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: is it an HF model directory? "
                                f"(pagedserve prepare-model creates the default one)")
    config = json.loads(path.read_text())
    return int(config["vocab_size"]), int(config.get("max_position_embeddings", 2048))


class SchedulerService:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        model_dir = config.model_dir()
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        vocab_size, max_positions = read_model_limits(model_dir)
        self.max_model_len = min(config.max_model_len or max_positions, max_positions)
        max_batched = config.max_num_batched_tokens
        if max_batched < config.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_batched}) must be at least "
                             f"max_num_seqs ({config.max_num_seqs}): every running sequence "
                             f"decodes a token each step")
        self.frontend = Frontend(self.tokenizer, vocab_size, self.max_model_len,
                                 config.max_num_seqs)
        self.processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.scheduler = Scheduler(None, config.max_num_seqs, max_batched,
                                   config.preemption_mode)
        self.engine = Engine(self.scheduler, self.processor)
        self.admin_handler = AdminHandler(self)
        self.metrics = Metrics(model_dir.name)
        self.metrics_server = None
        self._next_status = time.monotonic() + config.log_stats_interval
        self._busy_since_status = False
        self.executor_id: bytes | None = None
        self.executor_info: p.RegisterExecutor | None = None
        self._executor_heard = 0.0  # monotonic time of the registered executor's last word
        self.executors_lost = 0
        self.in_flight: deque[InFlight] = deque()  # oldest first; two at most
        self._ahead_tried = False  # schedule_ahead ran since the last result
        self._last_result = 0.0  # perf_counter when the last result was processed
        self._last_sent: dict[bytes, float] = {}   # client -> when we last sent it anything
        self._last_heard: dict[bytes, float] = {}  # client -> when it last sent us anything
        self._idle = False
        self._stopped = False
        self._bind_sockets()

    @property
    def ready(self) -> bool:
        return self.scheduler.block_manager is not None

    def _bind_sockets(self) -> None:
        self.ctx = zmq.Context()
        self.auth = None
        try:
            if self.config.auth:
                self.auth = SchedulerAuth(self.ctx, self.config.keys)
            host = self.config.host
            self.clients = self._bind(zmq.ROUTER, host, self.config.client_port, "client")
            self.executor = self._bind(zmq.ROUTER, host, self.config.executor_port, "executor")
            self.admin = self._bind(zmq.REP, host, self.config.admin_port, "admin")
            if self.config.metrics_port is not None:
                self.metrics_server = self.metrics.prometheus.serve(host,
                                                                    self.config.metrics_port)
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            raise

    def _bind(self, kind: int, host: str, port: int, domain: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.auth is not None:
            self.auth.secure(sock, domain)
        # libzmq drops a peer whose message is larger, before buffering it
        sock.setsockopt(zmq.MAXMSGSIZE, int(self.config.max_message_mb * (1 << 20)))
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind tcp://{host}:{port}: {exc}") from None
        return sock

    def stop(self) -> None:
        self._stopped = True

    def serve_forever(self) -> None:
        log.info("scheduler listening", client=self.config.client_port,
                 executor=self.config.executor_port, admin=self.config.admin_port,
                 max_model_len=self.max_model_len)
        poller = zmq.Poller()
        for sock in (self.clients, self.executor, self.admin):
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopped:
                events = dict(poller.poll(0 if self._can_step() else IDLE_POLL_MS))
                if events:
                    self._idle = False
                if self.clients in events:
                    self._drain(self.clients, self._on_client)
                if self.executor in events:
                    self._drain(self.executor, self._on_executor)
                if self.admin in events:
                    self.admin.send(self.admin_handler.handle(self.admin.recv()))
                self._keep_alive()
                self._check_executor()
                if self._can_step():
                    self._step()
                self.metrics.refresh(self.scheduler)
                self._log_status()
        finally:
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            log.info("scheduler stopped")

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

    def _can_step(self) -> bool:
        if not self.ready or not self.scheduler.has_work:
            return False
        if not self.in_flight:
            return not self._idle
        return (len(self.in_flight) == 1 and self.config.async_scheduling
                and not self._ahead_tried)

    def _drain(self, sock: zmq.Socket, handler) -> None:
        for _ in range(1000):  # bounded, so one busy socket cannot starve the others
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # A ROUTER prepends the peer's identity; our peers send exactly one frame.
            handler(frames[0], frames[1] if len(frames) == 2 else b"")

    # ------------------------------------------------------------ clients

    def _on_client(self, client: bytes, payload: bytes) -> None:
        self._last_heard[client] = time.monotonic()
        try:
            msg = p.decode(payload, (p.GenerateRequest, p.AbortRequest, p.Heartbeat))
        except p.ProtocolError as exc:
            self._send_client(client, p.ErrorMsg(code="protocol_error", message=str(exc)))
            return
        if isinstance(msg, p.Heartbeat):
            self._answer_lost(client, msg.request_ids or [])
            return
        if isinstance(msg, p.AbortRequest):
            self._abort(client, msg.request_id)
            return
        # Sequences waiting for admission: one per request, except requests whose samples
        # were preempted for recompute (then one per sample): O(1), and errs on the safe side.
        num_waiting = len(self.scheduler.waiting)
        if num_waiting >= self.config.max_waiting:
            self._send_client(client, p.ErrorMsg(
                code="overloaded", request_id=msg.request_id,
                message=f"{num_waiting} requests are already waiting (max_waiting "
                        f"{self.config.max_waiting}): retry later"))
            return
        try:
            request = self.frontend.create(client, msg)
        except InvalidRequest as exc:
            self._send_client(client, p.ErrorMsg(code="invalid_request", message=str(exc),
                                                 request_id=msg.request_id))
            return
        self.engine.add(request)
        log.debug("request added", request_id=request.request_id, prompt_tokens=len(
            request.prompt_token_ids))

    def _answer_lost(self, client: bytes, request_ids: list[str]) -> None:
        """A client waits for requests this scheduler does not hold: it restarted since
        (or they just finished, and the client has yet to read their last output, which was
        sent before this answer). Each gets a retriable ``request_lost`` error."""
        for request_id in request_ids:
            if (client, request_id) not in self.frontend.requests:
                self._send_client(client, p.ErrorMsg(
                    code="request_lost", request_id=request_id,
                    message=f"the scheduler holds no request {request_id!r}: it was lost in "
                            f"a scheduler restart; submit it again"))

    def _abort(self, client: bytes, request_id: str) -> None:
        request = self.frontend.requests.get((client, request_id))
        if request is None:
            return  # already finished: nothing to abort
        self.engine.abort(request)
        self._send_client(client, self.frontend.output(request))
        log.info("request aborted", request_id=request_id)

    def _send_client(self, client: bytes, msg) -> None:
        self.clients.send_multipart([client, p.encode(msg)])
        self._last_sent[client] = time.monotonic()

    def _keep_alive(self) -> None:
        """A heartbeat to each client with live requests that heard nothing for a second; a
        client silent for longer than ``client_timeout`` is gone: its requests are aborted
        and their blocks freed."""
        now = time.monotonic()
        live: dict[bytes, list[Request]] = {}
        for request in self.frontend.requests.values():
            live.setdefault(request.client, []).append(request)
        for client, requests in live.items():
            if now - self._last_heard.get(client, now) > self.config.client_timeout:
                self._forget(requests)
            elif now - self._last_sent.get(client, 0.0) >= p.CLIENT_HEARTBEAT_S:
                self._send_client(client, p.Heartbeat())
        for book in (self._last_sent, self._last_heard):
            for client in set(book) - set(live):
                del book[client]

    def _forget(self, requests: list[Request]) -> None:
        for request in requests:
            self.engine.abort(request)
            self.frontend.output(request)  # nobody to send it to
            log.warning("client gone: request aborted", request_id=request.request_id,
                        client_timeout=self.config.client_timeout)

    # ------------------------------------------------------------ executor

    def _on_executor(self, identity: bytes, payload: bytes) -> None:
        if identity.endswith(p.HEARTBEAT_SUFFIX):
            self._on_executor_heartbeat(identity, payload)
            return
        try:
            msg = p.decode(payload, (p.RegisterExecutor, p.ExecutorReady, p.StepResult,
                                     p.ErrorMsg))
        except p.ProtocolError as exc:
            log.error("bad message from executor", error=str(exc))
            self.executor.send_multipart([identity, p.encode(
                p.ErrorMsg(code="protocol_error", message=str(exc)))])
            return
        if identity == self.executor_id:
            self._executor_heard = time.monotonic()
        if isinstance(msg, p.RegisterExecutor):
            self._on_register(identity, msg)
        elif identity != self.executor_id:
            log.warning("message from an unregistered executor ignored", type=msg.TYPE)
        elif isinstance(msg, p.ExecutorReady):
            self._on_ready(msg)
        elif isinstance(msg, p.StepResult):
            self._on_result(msg)
        else:
            self._on_executor_error(msg)

    def _on_register(self, identity: bytes, msg: p.RegisterExecutor) -> None:
        if self.executor_id is not None and identity != self.executor_id:
            self.executor.send_multipart([identity, p.encode(p.ErrorMsg(
                code="unavailable", message="another executor is registered; retry"))])
            return
        if identity == self.executor_id:  # it restarted, or lost us: nothing it held is left
            self._executor_lost("it registered again")
        if msg.vocab_size < self.frontend.vocab_size:
            self.executor.send_multipart([identity, p.encode(p.ErrorMsg(
                code="invalid_request", message=f"executor model has vocab_size "
                f"{msg.vocab_size}, the scheduler's model {self.frontend.vocab_size}"))])
            return
        self.executor_id, self.executor_info = identity, msg
        self._executor_heard = time.monotonic()
        log.info("executor registered", model=msg.model, dtype=msg.dtype, device=msg.device)
        self._limit_context(msg.max_model_len, "the executor's model serves no more")
        self.executor.send_multipart([identity, p.encode(p.ConfigureExecutor(
            block_size=self.config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.scheduler.max_num_batched_tokens))])

    def _on_ready(self, msg: p.ExecutorReady) -> None:
        bm = BlockManager(self.config.block_size, msg.num_device_blocks, msg.num_cpu_blocks,
                          self.config.watermark, self.config.enable_prefix_caching)
        # Every sequence must fit in the pool on its own, or it could never run.
        fits = (bm.device.num_blocks - bm.watermark_blocks) * self.config.block_size
        self._limit_context(fits, "the KV pool holds no more")
        self.scheduler.block_manager = bm
        self.scheduler.cost_model = PreemptionCostModel(
            self.executor_info.kv_bytes_per_token * self.config.block_size)
        log.info("executor ready", device_blocks=msg.num_device_blocks,
                 cpu_blocks=msg.num_cpu_blocks, block_size=self.config.block_size)

    def _on_executor_heartbeat(self, identity: bytes, payload: bytes) -> None:
        """Answered for the registered executor only: an executor that hears nothing back
        registers again (after a scheduler restart, or after being taken for dead)."""
        if self.executor_id is None or identity != self.executor_id + p.HEARTBEAT_SUFFIX:
            return
        try:
            p.decode(payload, (p.Heartbeat,))
        except p.ProtocolError as exc:
            log.error("bad heartbeat from executor", error=str(exc))
            return
        self._executor_heard = time.monotonic()
        self.executor.send_multipart([identity, p.encode(p.Heartbeat())])

    def _check_executor(self) -> None:
        if self.executor_id is None:
            return
        if time.monotonic() - self._executor_heard <= self.config.executor_timeout:
            return
        # A long turn of the loop may have left its heartbeats unread: read them first.
        self._drain(self.executor, self._on_executor)
        silent = time.monotonic() - self._executor_heard
        if self.executor_id is not None and silent > self.config.executor_timeout:
            self._executor_lost(f"silent for {silent:.1f} s")

    def _executor_lost(self, why: str) -> None:
        """Forget the executor and everything it held; its sequences wait to be recomputed
        by the next one that registers (``pagedserve up`` and compose restart it)."""
        self.executor_id = self.executor_info = None
        self.in_flight.clear()  # their results will never come: their tokens are recomputed
        self._idle = False
        requeued = self.scheduler.recompute_all()
        self.executors_lost += 1
        log.error("executor lost: waiting for one to register", reason=why,
                  sequences_to_recompute=requeued)

    def _on_executor_error(self, msg: p.ErrorMsg) -> None:
        """The executor rejected the oldest plan in flight: a scheduler bug, so fail its
        requests (and those of the plan sent after it, which assumed it) loudly rather than
        retry the same plan forever."""
        log.error("executor rejected a plan", code=msg.code, message=msg.message)
        steps = [entry.step for entry in self.in_flight]
        self.in_flight.clear()
        requests = {seq.request.key: seq.request for step in steps for seq in step.seqs}
        for request in requests.values():
            self._fail(request, p.ErrorMsg(code="internal", request_id=request.request_id,
                                           message=f"the executor rejected a step: {msg.message}"))

    def _limit_context(self, max_model_len: int, why: str) -> None:
        """Lower max_model_len; queued prompts that no longer fit get an error."""
        if max_model_len >= self.max_model_len:
            return
        log.warning("max_model_len lowered", max_model_len=max_model_len, reason=why)
        self.max_model_len = self.frontend.max_model_len = max_model_len
        self.processor.max_model_len = max_model_len
        for request in list(self.frontend.requests.values()):
            if len(request.prompt_token_ids) >= max_model_len:
                self._fail(request, p.ErrorMsg(
                    code="invalid_request", request_id=request.request_id,
                    message=f"the prompt has {len(request.prompt_token_ids)} tokens, but "
                            f"{why} than {max_model_len} (max_model_len)"))

    def _fail(self, request: Request, error: p.ErrorMsg) -> None:
        self.engine.abort(request)
        self.frontend.output(request)  # forget the request; its client gets the error
        self._send_client(request.client, error)

    # ------------------------------------------------------------ steps

    def _step(self) -> None:
        started = time.perf_counter()
        if self.in_flight:
            self._ahead_tried = True  # nothing it depends on changes before the result
            scheduled = self.engine.schedule_ahead(self.in_flight[0].step)
            if scheduled is None:
                return
        else:
            scheduled = self.engine.schedule()
            for request in self.engine.take_capped():
                log.warning("request ended: its sequences outgrew the KV pool",
                            request_id=request.request_id)
                self._send_client(request.client, self.frontend.output(request))
            if scheduled is None:
                self._idle = True  # nothing fits until something changes: wait for an event
                return
        step, plan = scheduled
        self.in_flight.append(InFlight(step, plan.step, started))
        # Every log line from here on, about a request or not, names the step.
        structlog.contextvars.bind_contextvars(step=plan.step)
        self.executor.send_multipart([self.executor_id, p.encode(plan)])

    def _on_result(self, result: p.StepResult) -> None:
        if not self.in_flight or result.step != self.in_flight[0].step_no:
            log.error("result for an unexpected step ignored", step=result.step)
            return
        step, _, started = self.in_flight.popleft()
        self._ahead_tried = False
        requests = self.engine.process(step, result)
        self.metrics.observe(requests, time.monotonic())
        for request in requests:
            if request.is_finished:
                log.debug("request finished", request_id=request.request_id,
                          finish_reasons=[seq.finish_reason for seq in request.seqs],
                          output_tokens=request.num_generated)
            if request.stream or request.is_finished:
                self._send_client(request.client, self.frontend.output(request))
        # A step sent ahead began to occupy the loop only when the one before it ended.
        now = time.perf_counter()
        began, self._last_result = max(started, self._last_result), now
        self.metrics.observe_step((now - began) * 1e3, result.forward_ms, len(step.seqs),
                                  ahead=started < began)
