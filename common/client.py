"""Client library: submit prompts to a pagedserve scheduler and read vLLM-shaped outputs.

    from pagedserve.common.client import Client
    from pagedserve.common.sampling import SamplingParams

    with Client("tcp://127.0.0.1:5555") as client:
        out = client.generate("The capital of France is", SamplingParams(max_tokens=12))
        print(out.outputs[0].text)

        out = client.chat([{"role": "user", "content": "Name a colour."}])

Against a scheduler started with ``--auth``, pass ``keys=common.auth.peer_keys("client")``.
``AsyncClient`` offers the same methods as coroutines. ``Client`` runs an ``AsyncClient``
on a private event-loop thread, so one ``Client`` may be shared by many threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Mapping, Sequence

import zmq
import zmq.asyncio

from pagedserve.common import protocol as p
from pagedserve.common.auth import PeerKeys
from pagedserve.common.chat_template import ChatTemplate, ChatTemplateError
from pagedserve.common.config import SchedulerConfig, tcp_endpoint
from pagedserve.common.sampling import SamplingParams

Prompt = str | Sequence[int]
Messages = Sequence[Mapping]  # chat messages: {"role": ..., "content": ...}
ModelInfo = p.ModelInfo
# How long ``close`` may take to hand the aborts of live requests to the network.
CLOSE_LINGER_MS = 1000


class PagedServeError(Exception):
    """Base of every error the client raises."""


class InvalidRequestError(PagedServeError, ValueError):
    """The scheduler refused the request (bad prompt or sampling params); do not retry."""


class ServerError(PagedServeError):
    """The server failed the request or could not understand the client."""


class OverloadedError(ServerError):
    """The server's queue is full; retry later (with backoff)."""

    retriable = True


class RequestLostError(ServerError):
    """The scheduler restarted and no longer holds the request; submit it again."""

    retriable = True


class ServerTimeoutError(PagedServeError, TimeoutError):
    """No word from the server within the client's timeout; the request may be retried."""

    retriable = True


@dataclass
class CompletionOutput:
    """One completion of a request, as vLLM's ``CompletionOutput``."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, p.Logprob]] | None = None  # per position: the sampled token first
    finish_reason: str | None = None   # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's output, as vLLM's ``RequestOutput``; in ``stream`` only the new part."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # with SamplingParams.prompt_logprobs, in the first output: per prompt token (None for
    # the first) {token_id: Logprob}, the prompt's token first
    prompt_logprobs: list[dict[int, p.Logprob] | None] | None = None




DEFAULT_ADDRESS = tcp_endpoint(SchedulerConfig.client_port)  # a scheduler on this machine


class AsyncClient:
    """asyncio client; ``timeout`` is how long the server may stay silent (it sends a
    heartbeat every second while requests are live) before ``ServerTimeoutError``. The
    client sends one every second too while it has live requests: a client that stops is
    taken for gone, and its requests are aborted (the scheduler's ``--client-timeout``)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 30.0,
                 max_message_mb: float = p.MAX_MESSAGE_MB, keys: PeerKeys | None = None):
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = int(max_message_mb * (1 << 20))
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:  # a scheduler started with --auth: common.auth.peer_keys("client")
            keys.secure(self._sock)
        self._sock.connect(address)
        self._queues: dict[str, asyncio.Queue] = {}
        self._sent: set[str] = set()  # live requests the server has been sent
        self._reader: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self._chat_template: ChatTemplate | None = None  # the served model's, once asked

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Abort the requests still live (a stream left unfinished), then disconnect; a
        call still waiting for its output raises ``ServerError``."""
        live, self._sent = sorted(self._sent), set()
        for request_id in live:
            with contextlib.suppress(ServerTimeoutError):
                await self._send(p.encode(p.AbortRequest(request_id=request_id)), request_id)
        for queue in self._queues.values():
            queue.put_nowait(p.ErrorMsg(code="closed", message="the client was closed"))
        for task in (self._reader, self._pinger):
            if task is not None:
                task.cancel()
        # The aborts are queued, not yet sent: give them a moment to leave.
        self._ctx.destroy(linger=CLOSE_LINGER_MS if live else 0)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """Generate completions for one prompt (text or token ids) and return them whole."""
        return await _collect(self._run(prompt, params, request_id, stream=False))

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a ``RequestOutput`` per step holding only the new text and tokens;
        the deltas concatenate to what ``generate`` returns. Leaving the loop early (or
        closing the iterator) aborts the request."""
        async with contextlib.aclosing(self._run(prompt, params, request_id, stream=True)) as run:
            async for delta in run:
                yield delta

    async def chat(self, messages: Messages, params: SamplingParams | None = None,
                   request_id: str | None = None,
                   add_generation_prompt: bool = True) -> RequestOutput:
        """Generate the answer to a conversation (``messages``: dicts with "role" and
        "content"), rendered with the served model's chat template; the output's ``prompt``
        is the rendered text."""
        prompt = await self.render_chat(messages, add_generation_prompt)
        return await _collect(self._run(prompt, params, request_id, stream=False,
                                        add_special_tokens=False))

    async def chat_stream(self, messages: Messages, params: SamplingParams | None = None,
                          request_id: str | None = None,
                          add_generation_prompt: bool = True) -> AsyncIterator[RequestOutput]:
        """``chat``, streamed: a delta per step, as ``stream``."""
        prompt = await self.render_chat(messages, add_generation_prompt)
        async with contextlib.aclosing(self._run(prompt, params, request_id, stream=True,
                                                 add_special_tokens=False)) as run:
            async for delta in run:
                yield delta

    async def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt text ``chat`` sends for ``messages``: the served model's chat template
        (asked of the scheduler once) rendered here. Raises ``InvalidRequestError`` when the
        model has no template or the template refuses the conversation."""
        if self._chat_template is None:
            info = await self.model_info()
            if info.chat_template is None:
                raise InvalidRequestError(
                    f"the model {info.model} has no chat template: start the scheduler with "
                    f"--chat-template FILE, or send a plain prompt")
            self._chat_template = ChatTemplate(info.chat_template, info.special_tokens)
        try:
            return self._chat_template.render(messages, add_generation_prompt)
        except ChatTemplateError as exc:
            raise InvalidRequestError(str(exc)) from None

    async def model_info(self) -> ModelInfo:
        """The served model (name, context length, chat template) and whether an executor
        is ready now; asked of the scheduler on every call."""
        request_id = uuid.uuid4().hex
        self._start_reader()
        queue = self._queues[request_id] = asyncio.Queue()
        try:
            await self._send(p.encode(p.ModelInfoRequest(request_id=request_id)), request_id)
            return await self._next(queue, request_id)
        finally:
            del self._queues[request_id]

    async def abort(self, request_id: str) -> None:
        """Stop a request; its output ends with finish_reason "abort"."""
        await self._send(p.encode(p.AbortRequest(request_id=request_id)), request_id)

    async def _send(self, payload: bytes, request_id: str) -> None:
        """Send, or raise ``ServerTimeoutError`` when no connection to the server is up within
        ``timeout`` (a DEALER holds messages until one is: the server is down, or turns this
        client's key away)."""
        sending = self._sock.send(payload)
        if sending.done():  # sent at once, as while connected: no timer, no turn of the loop
            sending.result()
            return
        try:
            await asyncio.wait_for(sending, self.timeout)
        except asyncio.TimeoutError:
            raise ServerTimeoutError(
                f"could not reach {self.address} within {self.timeout:g} s for request "
                f"{request_id}: is the scheduler running (and, if it runs with --auth, are "
                f"these its keys)?") from None

    async def _run(self, prompt: Prompt, params: SamplingParams | None, request_id: str | None,
                   stream: bool, add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            raise InvalidRequestError(f"request_id {request_id!r} is already live")
        msg = p.GenerateRequest(request_id=request_id, params=params.to_dict(), stream=stream,
                                add_special_tokens=add_special_tokens)
        if isinstance(prompt, str):
            msg.prompt = prompt
        else:
            msg.prompt_token_ids = list(prompt)
        payload = p.encode(msg)
        if len(payload) > self.max_message_bytes:
            # the server would cut the connection off without reading it
            raise InvalidRequestError(
                f"the request is {len(payload)} bytes on the wire, more than the server's "
                f"{self.max_message_bytes} (--max-message-mb)")
        self._start_reader()
        queue = self._queues[request_id] = asyncio.Queue()
        finished = False
        try:
            await self._send(payload, request_id)
            self._sent.add(request_id)
            prompt_ids: list[int] = []
            text = prompt if isinstance(prompt, str) else None
            while not finished:
                out = await self._next(queue, request_id)
                if out.prompt_token_ids is not None:
                    prompt_ids = out.prompt_token_ids.tolist()
                text = out.prompt if out.prompt is not None else text  # token ids' text
                finished = out.finished
                yield _to_output(out, text, prompt_ids)
        finally:
            del self._queues[request_id]
            sent = request_id in self._sent
            self._sent.discard(request_id)
            if sent and not finished:
                with contextlib.suppress(ServerTimeoutError):
                    await self.abort(request_id)

    async def _next(self, queue: asyncio.Queue,
                    request_id: str) -> p.RequestOutputMsg | p.ModelInfo:
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), self.timeout)
            except asyncio.TimeoutError:
                raise ServerTimeoutError(
                    f"no reply from {self.address} for {self.timeout:g} s on request "
                    f"{request_id}: is the scheduler running?") from None
            if isinstance(msg, p.ErrorMsg):
                raise _error(msg)
            if msg is not None:  # None is a heartbeat: the server is alive, keep waiting
                return msg

    def _start_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        if self._pinger is None or self._pinger.done():
            self._pinger = loop.create_task(self._ping())

    async def _ping(self) -> None:
        """While requests are live, tell the server every second that this client is here,
        and which requests it waits for: a restarted server answers that it lost them."""
        while True:
            await asyncio.sleep(p.CLIENT_HEARTBEAT_S)
            if self._queues:
                await self._sock.send(p.encode(p.Heartbeat(request_ids=sorted(self._sent))))

    async def _read(self) -> None:
        while True:
            payload = await self._sock.recv()
            try:
                msg = p.decode(payload, (p.RequestOutputMsg, p.OutputBatch, p.ModelInfo,
                                         p.ErrorMsg, p.Heartbeat))
            except p.ProtocolError as exc:
                msg = p.ErrorMsg(code="protocol_error", message=f"bad reply from server: {exc}")
            for one in msg.outputs if isinstance(msg, p.OutputBatch) else [msg]:
                self._deliver(one)

    def _deliver(self, msg) -> None:
        if isinstance(msg, p.Heartbeat) or (isinstance(msg, p.ErrorMsg)
                                            and msg.request_id is None):
            targets = list(self._queues.values())  # belongs to every live request
        else:
            targets = [q for q in [self._queues.get(msg.request_id)] if q is not None]
        for queue in targets:
            queue.put_nowait(None if isinstance(msg, p.Heartbeat) else msg)


class Client:
    """Blocking client with the methods of ``AsyncClient``; safe to share between threads."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 30.0,
                 max_message_mb: float = p.MAX_MESSAGE_MB, keys: PeerKeys | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="pagedserve-client")
        self._thread.start()
        self._closed = False
        self._async = self._call(_make_async(address, timeout, max_message_mb, keys))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Abort the live requests and disconnect, as ``AsyncClient.close``."""
        if not self._closed:
            self._call(self._async.close())
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def generate(self, prompt: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 request_id: str | None = None) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt, or for a list of prompts submitted together (they
        batch on the server; ``params`` may then be one per prompt), returning outputs
        in the same order."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            many = params if isinstance(params, list) else [params] * len(prompt)
            if len(many) != len(prompt):
                raise ValueError(f"{len(prompt)} prompts but {len(many)} sampling params")

            async def gather():
                return await asyncio.gather(*(self._async.generate(x, sp)
                                              for x, sp in zip(prompt, many)))
            return self._call(gather())
        return self._call(self._async.generate(prompt, params, request_id))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield per-step deltas, as ``AsyncClient.stream``."""
        return self._iterate(self._async.stream(prompt, params, request_id))

    def chat(self, messages: Messages, params: SamplingParams | None = None,
             request_id: str | None = None, add_generation_prompt: bool = True) -> RequestOutput:
        """The answer to a conversation, as ``AsyncClient.chat``."""
        return self._call(self._async.chat(messages, params, request_id, add_generation_prompt))

    def chat_stream(self, messages: Messages, params: SamplingParams | None = None,
                    request_id: str | None = None,
                    add_generation_prompt: bool = True) -> Iterator[RequestOutput]:
        """Yield per-step deltas of ``chat``, as ``AsyncClient.chat_stream``."""
        return self._iterate(self._async.chat_stream(messages, params, request_id,
                                                     add_generation_prompt))

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt text ``chat`` sends, as ``AsyncClient.render_chat``."""
        return self._call(self._async.render_chat(messages, add_generation_prompt))

    def model_info(self) -> ModelInfo:
        """The served model and whether an executor is ready, as ``AsyncClient.model_info``."""
        return self._call(self._async.model_info())

    def _iterate(self, agen: AsyncIterator[RequestOutput]) -> Iterator[RequestOutput]:
        """An async iterator of the client's loop, iterated from this thread; closing this
        one (or leaving its loop) closes it, unless the client was closed first (which
        aborted its request)."""
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._call(agen.aclose())

    def abort(self, request_id: str) -> None:
        self._call(self._async.abort(request_id))

    def _call(self, coro):
        if self._closed:  # its loop has stopped: nothing would ever run the call
            coro.close()
            raise PagedServeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


async def _collect(deltas: AsyncIterator[RequestOutput]) -> RequestOutput:
    total = None
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            total = delta if total is None else _merge(total, delta)
    return total


async def _make_async(address: str, timeout: float, max_message_mb: float,
                      keys: PeerKeys | None) -> AsyncClient:
    return AsyncClient(address, timeout, max_message_mb, keys)


def _to_output(msg: p.RequestOutputMsg, prompt: str | None, prompt_ids: list[int]) -> RequestOutput:
    return RequestOutput(
        request_id=msg.request_id, prompt=prompt, prompt_token_ids=prompt_ids,
        finished=msg.finished, prompt_logprobs=msg.prompt_logprobs,
        outputs=[CompletionOutput(index=d.index, text=d.text, token_ids=d.token_ids.tolist(),
                                  cumulative_logprob=d.cumulative_logprob,
                                  logprobs=d.logprobs, finish_reason=d.finish_reason,
                                  stop_reason=d.stop_reason) for d in msg.outputs])


def _merge(total: RequestOutput, delta: RequestOutput) -> RequestOutput:
    for out, new in zip(total.outputs, delta.outputs):
        out.text += new.text
        out.token_ids += new.token_ids
        if new.logprobs is not None:
            out.logprobs = (out.logprobs or []) + new.logprobs
        out.cumulative_logprob = new.cumulative_logprob
        out.finish_reason, out.stop_reason = new.finish_reason, new.stop_reason
    total.finished = delta.finished
    return total


def _error(msg: p.ErrorMsg) -> PagedServeError:
    if msg.code == "invalid_request":
        return InvalidRequestError(msg.message)
    if msg.code == "overloaded":
        return OverloadedError(msg.message)
    if msg.code == "request_lost":
        return RequestLostError(msg.message)
    return ServerError(f"{msg.code}: {msg.message}")
