"""The client side of the scheduler: the client socket, request intake, and client liveness."""
from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from pagedserve.common import protocol as p
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.log import get_logger
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.frontend import Frontend, InvalidRequest
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.session import ContextLimit

log = get_logger("scheduler")


class ClientLink:
    """Requests in (generate, abort, model info, heartbeat), outputs and errors out. A client
    with live requests hears from us at least every ``CLIENT_HEARTBEAT_S``; a client silent for
    longer than ``client_timeout`` is gone: its requests are aborted and their blocks freed.
    ``model_info(request_id)``: the answer to a model info request, with the service's state."""

    def __init__(self, sock: zmq.Socket, frontend: Frontend, engine: Engine,
                 config: SchedulerConfig, model_info: Callable[[str], p.ModelInfo]):
        self.sock = sock
        self.frontend = frontend
        self.engine = engine
        self.model_info = model_info
        self.max_waiting = config.max_waiting
        self.client_timeout = config.client_timeout
        self._last_sent: dict[bytes, float] = {}   # client -> when we last sent it anything
        self._last_heard: dict[bytes, float] = {}  # client -> when it last sent us anything

    @property
    def num_live_requests(self) -> int:
        return len(self.frontend.requests)

    def on_message(self, client: bytes, payload: bytes) -> None:
        self._last_heard[client] = time.monotonic()
        try:
            msg = p.decode(payload, (p.GenerateRequest, p.AbortRequest, p.ModelInfoRequest,
                                     p.Heartbeat))
        except p.ProtocolError as exc:
            self.send(client, p.ErrorMsg(code="protocol_error", message=str(exc)))
            return
        if isinstance(msg, p.Heartbeat):
            self._answer_lost(client, msg.request_ids or [])
        elif isinstance(msg, p.AbortRequest):
            self._abort(client, msg.request_id)
        elif isinstance(msg, p.ModelInfoRequest):
            self.send(client, self.model_info(msg.request_id))
        else:
            self._intake(client, msg)

    def send(self, client: bytes, msg) -> None:
        self.sock.send_multipart([client, p.encode(msg)])
        self._last_sent[client] = time.monotonic()

    def send_output(self, request: Request) -> None:
        """What changed in the request's output since the last message (all of it at the end)."""
        self.send(request.client, self.frontend.output(request))

    def send_outputs(self, requests: list[Request]) -> None:
        """The new output of requests a step touched: each step's for streaming requests, all
        at once for the others when they finish; one message per client (a batch where it
        has several)."""
        by_client: dict[bytes, list[p.RequestOutputMsg]] = {}
        for request in requests:
            if request.is_finished:
                log.debug("request finished", request_id=request.request_id,
                          finish_reasons=[seq.finish_reason for seq in request.seqs],
                          output_tokens=request.num_generated)
            if request.stream or request.is_finished:
                by_client.setdefault(request.client, []).append(self.frontend.output(request))
        for client, outputs in by_client.items():
            self.send(client, outputs[0] if len(outputs) == 1 else p.OutputBatch(outputs))

    def fail(self, request: Request, error: p.ErrorMsg) -> None:
        """End the request and tell its client ``error`` instead of an output."""
        self.engine.abort(request)
        self.frontend.output(request)  # forget the request; its client gets the error
        self.send(request.client, error)

    def fail_longer_than(self, limit: ContextLimit) -> None:
        """Fail every live request whose prompt no longer fits ``limit``."""
        for request in list(self.frontend.requests.values()):
            if len(request.prompt_token_ids) >= limit.max_model_len:
                self.fail(request, p.ErrorMsg(
                    code="invalid_request", request_id=request.request_id,
                    message=f"the prompt has {len(request.prompt_token_ids)} tokens, but "
                            f"{limit.why} than {limit.max_model_len} (max_model_len)"))

    def keep_alive(self) -> None:
        """A heartbeat to each client with live requests that heard nothing for a second;
        the requests of a client silent for longer than ``client_timeout`` are aborted."""
        now = time.monotonic()
        live: dict[bytes, list[Request]] = {}
        for request in self.frontend.requests.values():
            live.setdefault(request.client, []).append(request)
        for client, requests in live.items():
            if now - self._last_heard.get(client, now) > self.client_timeout:
                self._forget(requests)
            elif now - self._last_sent.get(client, 0.0) >= p.CLIENT_HEARTBEAT_S:
                self.send(client, p.Heartbeat())
        for book in (self._last_sent, self._last_heard):
            for client in set(book) - set(live):
                del book[client]

    def _intake(self, client: bytes, msg: p.GenerateRequest) -> None:
        # Sequences waiting for admission: one per request, except requests whose samples
        # were preempted for recompute (then one per sample): O(1), and errs on the safe side.
        num_waiting = len(self.engine.scheduler.waiting)
        if num_waiting >= self.max_waiting:
            self.send(client, p.ErrorMsg(
                code="overloaded", request_id=msg.request_id,
                message=f"{num_waiting} requests are already waiting (max_waiting "
                        f"{self.max_waiting}): retry later"))
            return
        try:
            request = self.frontend.create(client, msg)
        except InvalidRequest as exc:
            self.send(client, p.ErrorMsg(code="invalid_request", message=str(exc),
                                         request_id=msg.request_id))
            return
        self.engine.add(request)
        log.debug("request added", request_id=request.request_id,
                  prompt_tokens=len(request.prompt_token_ids))

    def _answer_lost(self, client: bytes, request_ids: list[str]) -> None:
        """A client waits for requests this scheduler does not hold: it restarted since
        (or they just finished, and the client has yet to read their last output, which was
        sent before this answer). Each gets a retriable ``request_lost`` error."""
        for request_id in request_ids:
            if (client, request_id) not in self.frontend.requests:
                self.send(client, p.ErrorMsg(
                    code="request_lost", request_id=request_id,
                    message=f"the scheduler holds no request {request_id!r}: it was lost in "
                            f"a scheduler restart; submit it again"))

    def _abort(self, client: bytes, request_id: str) -> None:
        request = self.frontend.requests.get((client, request_id))
        if request is None:
            return  # already finished: nothing to abort
        self.engine.abort(request)
        self.send_output(request)
        log.info("request aborted", request_id=request_id)

    def _forget(self, requests: list[Request]) -> None:
        for request in requests:
            self.engine.abort(request)
            self.frontend.output(request)  # nobody to send it to
            log.warning("client gone: request aborted", request_id=request.request_id,
                        client_timeout=self.client_timeout)
