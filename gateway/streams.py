"""Server-sent events, and the request streams behind them.

A streamed response begins only once its first output is in (``started``): an error before
it (a prompt past the context, a full queue) is still answered with its HTTP status. Once
streaming, every exit (the end, an error, a client gone mid-stream) closes the request
streams, and closing a client stream that has not finished aborts its request at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def event(body: dict) -> str:
    """One server-sent event holding ``body`` as JSON."""
    return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose generator is closed however the response ends."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        """Streams while it waits for the client's disconnect, which cancels the stream (and
        so aborts its requests at once), as Starlette's own does, on two asyncio tasks where
        Starlette opens an anyio task group: 0.18 ms of each streamed request's time to first
        token here (BENCHMARKS.md, "What the gateway adds to one request's TTFT")."""
        streaming = await unless_disconnected(self.stream_response(send), receive)
        if not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()

    async def stream_response(self, send) -> None:
        async with contextlib.aclosing(self.body_iterator):
            await super().stream_response(send)


async def unless_disconnected(work: Awaitable, receive) -> asyncio.Task:
    """``work``'s task, run until it ends or the HTTP client disconnects first (``receive``
    gives ``http.disconnect``; the body has been read, so that is its next message): then
    the task is cancelled, and its clean-up (a stream's close, a request's abort) has run
    when this returns."""
    working = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait([working, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, gone):
            task.cancel()
        await asyncio.gather(working, gone, return_exceptions=True)
    return working


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """``(i, item)`` from every stream as items arrive, ``i`` being the stream's index; the
    first error of any stream ends all of them and is raised."""
    if len(streams) == 1:  # its items as they come: no task and queue between
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None))
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait((i, None, exc))
        else:
            queue.put_nowait((i, end, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is end:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:  # each cancelled stream aborts its request
            task.cancel()


async def started(stream: AsyncIterator) -> AsyncIterator:
    """``stream`` once its first item is in (it has one: every request ends with an
    output); raises what the stream raised before it."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    return _prepend(first, stream)


async def _prepend(first, stream: AsyncIterator) -> AsyncIterator:
    async with contextlib.aclosing(stream):
        yield first
        async for item in stream:
            yield item
