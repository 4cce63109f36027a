"""The scheduler as the gateway sees it: one shared ``AsyncClient``, what the scheduler
says of its model and executor (asked at most once per ``max_age_s`` for requests), and
resubmission of a whole request that a restarted scheduler reports lost.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from pagedserve.common.client import (AsyncClient, PagedServeError, Prompt, RequestLostError,
                                      RequestOutput)
from pagedserve.common.log import get_logger
from pagedserve.common.protocol import ModelInfo
from pagedserve.common.sampling import SamplingParams
from pagedserve.gateway.errors import APIError

log = get_logger("gateway")

MAX_RESUBMITS = 3   # a lost request is submitted again this many times at most
INFO_MAX_AGE_S = 1.0  # how stale the executor's readiness may be when a request is let in


class Backend:
    """The scheduler behind the gateway. ``info_timeout_s``: how long ``info`` waits for the
    scheduler before it is taken for unreachable (a 503)."""

    def __init__(self, client: AsyncClient, info_timeout_s: float = 3.0):
        self.client = client
        self.info_timeout_s = info_timeout_s
        self._lock = asyncio.Lock()
        self._asked_at = -float("inf")
        self._answer: ModelInfo | APIError | None = None

    async def info(self, max_age_s: float = 0.0) -> ModelInfo:
        """The scheduler's model and readiness, no older than ``max_age_s``; a 503
        ``APIError`` when the scheduler does not answer (remembered as long)."""
        async with self._lock:
            if time.monotonic() - self._asked_at > max_age_s:
                self._answer = await self._ask()
                self._asked_at = time.monotonic()
        if isinstance(self._answer, APIError):
            raise self._answer
        return self._answer

    async def ready(self, model: str | None) -> ModelInfo:
        """``info`` for a request naming ``model``: a 503 while no executor is ready, a 404
        for a model this gateway does not serve."""
        info = await self.info(INFO_MAX_AGE_S)
        if model is not None and model != info.model:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{info.model!r}", "model", "model_not_found")
        if not info.executor_ready:
            raise APIError(503, "no executor is ready: the model is loading, or its executor "
                                "was lost and is being replaced; retry shortly",
                           code="executor_not_ready")
        return info

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str) -> RequestOutput:
        """``AsyncClient.generate``, submitted again if a scheduler restart lost it."""
        return await self._resubmitting(
            request_id, lambda rid: self.client.generate(prompt, params, rid))

    async def chat(self, messages: list[dict], params: SamplingParams, request_id: str,
                   add_generation_prompt: bool) -> RequestOutput:
        """``AsyncClient.chat``, submitted again if a scheduler restart lost it."""
        return await self._resubmitting(request_id, lambda rid: self.client.chat(
            messages, params, rid, add_generation_prompt=add_generation_prompt))

    def stream(self, prompt: Prompt, params: SamplingParams,
               request_id: str) -> AsyncIterator[RequestOutput]:
        """``AsyncClient.stream``; a lost stream is not resubmitted (its client has part of
        it already)."""
        return self.client.stream(prompt, params, request_id)

    def chat_stream(self, messages: list[dict], params: SamplingParams, request_id: str,
                    add_generation_prompt: bool) -> AsyncIterator[RequestOutput]:
        return self.client.chat_stream(messages, params, request_id,
                                       add_generation_prompt=add_generation_prompt)

    async def _ask(self) -> ModelInfo | APIError:
        try:
            return await asyncio.wait_for(self.client.model_info(), self.info_timeout_s)
        except (PagedServeError, asyncio.TimeoutError) as exc:
            return APIError(503, f"the scheduler at {self.client.address} does not answer "
                                 f"({exc or 'no reply'}): is it running?",
                            code="scheduler_unreachable")

    @staticmethod
    async def _resubmitting(request_id: str,
                            submit: Callable[[str], Awaitable[RequestOutput]]) -> RequestOutput:
        """``submit(request_id)``, again while the scheduler reports it lost. Each attempt
        has an id of its own: replies still on their way about an earlier one (its abort,
        a second "lost" answer) must not reach the next."""
        for attempt in range(MAX_RESUBMITS + 1):
            try:
                return await submit(f"{request_id}.{attempt}" if attempt else request_id)
            except RequestLostError:
                if attempt == MAX_RESUBMITS:
                    raise
                log.warning("request lost in a scheduler restart; submitting it again",
                            request_id=request_id, attempt=attempt + 1)
