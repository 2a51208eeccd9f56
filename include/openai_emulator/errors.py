"""OpenAI's error contract: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Handlers raise :class:`APIError`; the app turns it (and FastAPI's own validation and routing
errors) into that body, so the official client raises the matching ``openai`` exception
(``BadRequestError`` for 400, ``AuthenticationError`` for 401, ``NotFoundError`` for 404, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# The ``type`` OpenAI puts in error bodies, by status, when nothing more specific applies.
_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
}

# Messages for injected faults, in the spirit of the real service's.
DEFAULT_MESSAGES = {
    408: "Request timed out.",
    409: "The request conflicted with another request. Please try again.",
    429: "Rate limit reached for requests. Please try again later.",
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The server is overloaded or not ready yet.",
    504: "Gateway timeout.",
}


def default_type(status: int, code: str | None = None) -> str:
    """The error ``type`` for a status (``insufficient_quota`` is its own type, as at OpenAI)."""
    if code == "insufficient_quota":
        return "insufficient_quota"
    if status >= 500:
        return "server_error"
    return _DEFAULT_TYPES.get(status, "invalid_request_error")


class APIError(Exception):
    """An error answered in OpenAI's shape; raise it from a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or default_type(status, code)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = "id") -> APIError:
    """A 404 for an unknown object id."""
    return APIError(404, message, param=param)
