"""The Starlette application: OpenAI's endpoints over one shared ``AsyncClient``.

``/v1/*`` take a bearer key when the gateway has one; ``/health``, ``/metrics`` and
``/version`` are open (health checks and scrapers carry no key), as in vLLM's server.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pagedserve.common.auth import PeerKeys
from pagedserve.common.client import AsyncClient, PagedServeError
from pagedserve.common.protocol import MAX_MESSAGE_MB
from pagedserve.gateway import errors
from pagedserve.gateway.api_key import BearerKey
from pagedserve.gateway.backend import Backend
from pagedserve.gateway.body_limit import BodyLimit
from pagedserve.gateway.errors import APIError, from_client_error
from pagedserve.gateway.metrics import HTTPMetrics, exposition
from pagedserve.gateway.params import chat_params, completion_params
from pagedserve.gateway.responses import ChatShaper, CompletionShaper
from pagedserve.gateway.schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from pagedserve.gateway.streams import (DONE, EventStreamResponse, event, merged, started,
                                        unless_disconnected)

Body = TypeVar("Body", bound=SamplingFields)


@dataclass(frozen=True)
class GatewaySettings:
    """What one gateway process serves. ``server``: the scheduler's client endpoint;
    ``keys``: the client keys of a scheduler run with ``--auth``; ``api_key``: the bearer
    token of ``/v1/*`` (None: open); ``scheduler_metrics``: the URL of the scheduler's
    Prometheus metrics, appended to ``/metrics``; ``timeout``: seconds of scheduler
    silence before a request fails."""

    server: str
    keys: PeerKeys | None = None
    api_key: str | None = None
    scheduler_metrics: str | None = None
    timeout: float = 30.0


def create_app(settings: GatewaySettings) -> Starlette:
    """The gateway's ASGI application; its ``AsyncClient`` lives as long as the app runs."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        client = AsyncClient(settings.server, timeout=settings.timeout, keys=settings.keys)
        app.state.backend = Backend(client)
        try:
            yield
        finally:
            await client.close()

    served_version = version("pagedserve")  # read once: a lookup in the installed metadata
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(namespace="pagedserve_gateway", registry=registry)  # its CPU, memory

    async def health(request: Request) -> JSONResponse:
        """200 while an executor is ready, else 503."""
        info = await _backend(request).info()
        return JSONResponse({"status": "ready" if info.executor_ready else "not_ready",
                             "model": info.model},
                            status_code=200 if info.executor_ready else 503)

    async def metrics(_: Request) -> Response:
        return Response(await exposition(registry, settings.scheduler_metrics),
                        media_type=CONTENT_TYPE_LATEST)

    async def server_version(_: Request) -> JSONResponse:
        return JSONResponse({"version": served_version})

    routes = [Route("/health", health), Route("/metrics", metrics),
              Route("/version", server_version), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    middleware = [Middleware(BodyLimit, limit=int(MAX_MESSAGE_MB * (1 << 20))),
                  Middleware(HTTPMetrics, registry=registry)]
    if settings.api_key is not None:  # inside the metrics, which count its refusals
        middleware.append(Middleware(BearerKey, key=settings.api_key, prefix="/v1/"))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers=errors.HANDLERS)


async def models(request: Request) -> JSONResponse:
    info = await _backend(request).info()
    return JSONResponse({"object": "list", "data": [{
        "id": info.model, "object": "model", "created": 0, "owned_by": "pagedserve",
        "root": info.model, "parent": None, "max_model_len": info.max_model_len}]})


async def completions(request: Request) -> Response:
    body = await _body(request, CompletionRequest)
    backend = _backend(request)
    info = await backend.ready(body.model)
    params = completion_params(body)
    prompts = _prompts(body)
    shaper = CompletionShaper(info.model, params.n, body.echo, body.logprobs is not None)
    _check_stream(body, params)
    if body.stream:
        deltas = await _started(merged([backend.stream(p, params, shaper.request_id(i))
                                        for i, p in enumerate(prompts)]), "prompt")
        return EventStreamResponse(_events(shaper, deltas, _include_usage(body)))
    outputs = await _unless_gone(request, _all(
        [backend.generate(p, params, shaper.request_id(i)) for i, p in enumerate(prompts)],
        "prompt"))
    return JSONResponse(shaper.response(outputs))


async def chat_completions(request: Request) -> Response:
    body = await _body(request, ChatCompletionRequest)
    backend = _backend(request)
    info = await backend.ready(body.model)
    params = chat_params(body, info.max_model_len)
    messages = [m.to_dict() for m in body.messages]
    shaper = ChatShaper(info.model, params.n, params.logprobs if body.logprobs else None)
    request_id = shaper.request_id(0)
    _check_stream(body, params)
    if body.stream:
        deltas = await _started(merged([backend.chat_stream(
            messages, params, request_id, body.add_generation_prompt)]), "messages")
        return EventStreamResponse(_events(shaper, deltas, _include_usage(body)))
    out = await _unless_gone(request, _all(
        [backend.chat(messages, params, request_id, body.add_generation_prompt)],
        "messages"))
    return JSONResponse(shaper.response(out[0]))


def _backend(request: Request) -> Backend:
    return request.app.state.backend


async def _body(request: Request, schema: type[Body]) -> Body:
    """The request's JSON body as ``schema``, parsed and checked in one pass of pydantic's
    core (a 400 naming the field when it is not)."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as exc:
        raise errors.validation_error(exc.errors()) from None


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _prompts(body: CompletionRequest) -> list:
    """The request's prompts: one string or token-id list, or a list of them."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    return prompt


def _check_stream(body, params) -> None:
    """vLLM's rules: ``stream_options`` only with ``stream``; a stream sends samples as they
    are drawn, so it cannot keep only the best of them (``best_of`` above ``n``, beams)."""
    if not body.stream:
        if body.stream_options is not None:
            raise APIError(400, "stream_options needs stream set to true", "stream_options")
        return
    if params.best_of is not None and params.best_of > params.n:
        raise APIError(400, f"best_of ({params.best_of}) above n ({params.n}) cannot stream",
                       "best_of")
    if params.beam_width > 1:
        raise APIError(400, "beam search cannot stream", "use_beam_search")


async def _started(stream, param: str):
    try:
        return await started(stream)
    except PagedServeError as exc:
        raise from_client_error(exc, param) from None


async def _all(coros: list, param: str) -> list:
    """Run the requests together; the first to fail cancels the others (each abort is
    sent) and answers the HTTP request."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except PagedServeError as exc:
        raise from_client_error(exc, param) from None
    finally:
        for task in tasks:
            task.cancel()


async def _unless_gone(request: Request, answer: Awaitable):
    """``answer``'s result, unless the HTTP client goes away first: then it is cancelled
    (a cancelled request sends its abort, and its blocks are freed at once)."""
    answering = await unless_disconnected(answer, request.receive)
    if answering.cancelled():
        raise APIError(499, "the client closed the connection before the answer",
                       code="client_closed")
    return answering.result()


async def _events(shaper: CompletionShaper | ChatShaper, deltas, include_usage: bool):
    """The stream's events: the shaper's opening chunks, a chunk per step of each prompt,
    the usage if asked, ``[DONE]``; an error mid-stream is an event in OpenAI's shape."""
    for chunk in shaper.opening():
        yield event(chunk)
    seen: set[int] = set()
    try:
        async for prompt_index, delta in deltas:
            yield event(shaper.chunk(prompt_index, delta, prompt_index not in seen))
            seen.add(prompt_index)
    except PagedServeError as exc:
        yield event(from_client_error(exc).body())
    if include_usage:
        yield event(shaper.usage_chunk())
    yield DONE
