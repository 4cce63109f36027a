"""The FastAPI application: OpenAI's endpoints over one shared ``AsyncClient``.

``/v1/*`` take a bearer key when the gateway has one; ``/health``, ``/metrics`` and
``/version`` are open (health checks and scrapers carry no key), as in vLLM's server.
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector

from pagedserve.common.auth import PeerKeys
from pagedserve.common.client import AsyncClient, PagedServeError
from pagedserve.common.protocol import MAX_MESSAGE_MB
from pagedserve.gateway import errors
from pagedserve.gateway.backend import Backend
from pagedserve.gateway.body_limit import BodyLimit
from pagedserve.gateway.errors import APIError, from_client_error
from pagedserve.gateway.metrics import HTTPMetrics, exposition
from pagedserve.gateway.params import chat_params, completion_params
from pagedserve.gateway.responses import ChatShaper, CompletionShaper
from pagedserve.gateway.schema import ChatCompletionRequest, CompletionRequest
from pagedserve.gateway.streams import (DONE, EventStreamResponse, event, merged, started,
                                        unless_disconnected)


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


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI application; its ``AsyncClient`` lives as long as the app runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = AsyncClient(settings.server, timeout=settings.timeout, keys=settings.keys)
        app.state.backend = Backend(client)
        try:
            yield
        finally:
            await client.close()

    served_version = version("pagedserve")  # read once: a lookup in the installed metadata
    app = FastAPI(title="pagedserve", version=served_version, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    errors.install(app)
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(namespace="pagedserve_gateway", registry=registry)  # its CPU, memory
    app.add_middleware(HTTPMetrics, registry=registry)
    app.add_middleware(BodyLimit, limit=int(MAX_MESSAGE_MB * (1 << 20)))
    app.include_router(_v1_router(), dependencies=[Depends(_key_check(settings.api_key))])

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 while an executor is ready, else 503."""
        info = await _backend(request).info()
        return JSONResponse({"status": "ready" if info.executor_ready else "not_ready",
                             "model": info.model},
                            status_code=200 if info.executor_ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await exposition(registry, settings.scheduler_metrics),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": served_version}

    return app


def _v1_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models(request: Request) -> dict:
        info = await _backend(request).info()
        return {"object": "list", "data": [{
            "id": info.model, "object": "model", "created": 0, "owned_by": "pagedserve",
            "root": info.model, "parent": None, "max_model_len": info.max_model_len}]}

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
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
        return shaper.response(outputs)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
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
        return shaper.response(out[0])

    return router


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _key_check(api_key: str | None):
    """A dependency refusing a request without ``Authorization: Bearer <api_key>``; the
    comparison takes the same time wherever the key differs."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                                 api_key.encode()):
            raise APIError(401, "missing or wrong API key: send it as "
                                "'Authorization: Bearer <key>'", code="invalid_api_key")

    return check


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
