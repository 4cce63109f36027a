"""ASGI middleware that refuses an HTTP request under a path prefix without the bearer key,
before any routing or body reading."""
from __future__ import annotations

import hmac

from pagedserve.gateway.errors import APIError

_REFUSED = APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                    code="invalid_api_key")


class BearerKey:
    """Wraps ``app``: requests whose path starts with ``prefix`` need ``Authorization:
    Bearer <key>``; the comparison takes the same time wherever the key differs."""

    def __init__(self, app, key: str, prefix: str):
        self.app, self.key, self.prefix = app, key.encode(), prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            given = next((value for name, value in scope["headers"]
                          if name == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.key):
                await _REFUSED.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
