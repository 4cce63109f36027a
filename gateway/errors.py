"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the gateway answers goes through ``APIError``: bad input (400, naming the
field in ``param``), a missing or wrong key (401), an unknown model (404), a body over the
cap (413), no executor ready or a full queue (503), and a client gone before its answer
(499, as nginx logs it: nobody reads it, the metrics count it). The client library's errors
map onto these in ``from_client_error``.
"""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagedserve.common.client import (InvalidRequestError, OverloadedError, PagedServeError,
                                      ServerTimeoutError)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI does; ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_client_error(exc: PagedServeError, param: str | None = None) -> APIError:
    """The answer to a request the scheduler refused or could not serve; ``param``: the
    request field an invalid request is about (its prompt or messages)."""
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param)
    if isinstance(exc, OverloadedError):
        return APIError(503, str(exc), code="overloaded")
    if isinstance(exc, ServerTimeoutError):
        return APIError(503, str(exc), code="scheduler_unreachable")
    return APIError(500, str(exc))


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (404, 405, a body over the cap) in OpenAI's shape."""
    return APIError(exc.status_code, str(exc.detail)).response()


HANDLERS = {APIError: _api_error, HTTPException: _http_error}


def validation_error(errors) -> APIError:
    """A 400 from pydantic's errors: every problem in the message, the first field as
    ``param`` (a union's alternatives each report their own mismatch)."""
    problems, params = [], []
    for error in errors:
        loc = [str(part) for part in error["loc"] if part != "body"]
        if error["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error')}")
            continue
        if loc:
            params.append(loc[0])
        where = ".".join(loc) or "body"
        problems.append(f"{where}: {error['msg']}"
                        + (f" (got {error['input']!r:.60})" if "input" in error and loc else ""))
    return APIError(400, "; ".join(problems), params[0] if params else None)
