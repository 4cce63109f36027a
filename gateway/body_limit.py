"""ASGI middleware that refuses a request body over a cap with a 413, before it is read
into memory (by its Content-Length) or as soon as a chunked body passes the cap."""
from __future__ import annotations

from starlette.exceptions import HTTPException

from pagedserve.gateway.errors import APIError


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes, the most a request may send"


class BodyLimit:
    """Wraps ``app``; ``limit``: the most bytes a request body may have."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            await APIError(413, _too_large(self.limit)).response()(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # an HTTPException: the app answers it (errors.HANDLERS)
                raise HTTPException(413, _too_large(self.limit))
            return message

        await self.app(scope, counting_receive, send)
