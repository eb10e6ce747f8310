"""The one place where failures become HTTP errors: one helper per protocol.

TGI answers errors as `{"error": msg, "error_type": type}` with 422 validation, 429
overloaded, 424 generation and 500 incomplete_generation. The TGIServer raises `TGIError`
carrying the engine's own status and type; the ingress turns any exception into a response
(or, once a stream has started, into an SSE event) through `to_tgi_error` only.

The OpenAI routes answer the engine's errors in TGI's shape too, as TGI itself does. The one
error TGI has no counterpart for is the ingress's own: a `model` this app does not serve
(TGI serves one model and ignores the field). That one is `OpenAIError`, answered in
OpenAI's shape by `openai_error_response`, so OpenAI SDKs see `code == "model_not_found"`.
"""

import contextlib
import json
import math
from collections.abc import Iterator

from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

STATUS_BY_ERROR_TYPE = {
    "validation": 422,
    "overloaded": 429,
    "generation": 424,
    "incomplete_generation": 500,
}


class TGIError(Exception):
    """An error in TGI's shape: the launcher's answer, or a request the ingress refuses.

    All three values are passed to `Exception.__init__` so the error pickles across Ray.
    """

    def __init__(self, message: str, status_code: int, error_type: str):
        super().__init__(message, status_code, error_type)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type

    def __str__(self) -> str:
        return f"{self.status_code} {self.error_type}: {self.message}"

    @classmethod
    def from_payload(cls, status_code: int, payload: object) -> "TGIError":
        """Build from an error body; `status_code` 200 means an error event inside a stream."""
        if isinstance(payload, dict) and "error" in payload:
            message = str(payload["error"])
            error_type = str(payload.get("error_type") or "")
        else:
            message, error_type = str(payload), ""
        if not error_type:
            error_type = {422: "validation", 429: "overloaded", 424: "generation"}.get(
                status_code, "incomplete_generation"
            )
        if status_code < 400:
            status_code = STATUS_BY_ERROR_TYPE.get(error_type, 500)
        return cls(message, status_code, error_type)


class OpenAIError(Exception):
    """An error the ingress answers in OpenAI's shape:
    `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        status_code: int,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message, status_code, error_type, code, param)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.code = code
        self.param = param

    @classmethod
    def model_not_found(cls, model: str) -> "OpenAIError":
        """What the OpenAI API answers for an unknown model: 404, its message, `param` null."""
        message = f"The model `{model}` does not exist or you do not have access to it."
        return cls(message, 404, "invalid_request_error", code="model_not_found")


@contextlib.contextmanager
def serve_refusals_as_tgi_errors() -> Iterator[None]:
    """Serve's own refusals of a handle call as TGI errors: a full queue
    (max_queued_requests) is TGI's 429 overloaded. Serve registers its own handlers for
    these on the ingress app (plain-text 503s), which would win over the app's."""
    try:
        yield
    except BackPressureError:
        raise TGIError("Model is overloaded", 429, "overloaded") from None
    except DeploymentUnavailableError as exc:
        raise TGIError(exc.message, 503, "unavailable") from None


def to_tgi_error(exc: BaseException) -> tuple[int, dict[str, str]]:
    """Map any exception raised while serving a request to (HTTP status, TGI error body)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause  # the replica's own exception, re-raised by the handle
    if isinstance(exc, TGIError):
        return exc.status_code, {"error": exc.message, "error_type": exc.error_type}
    if isinstance(exc, BackPressureError):
        return 429, {"error": "Model is overloaded", "error_type": "overloaded"}
    return 500, {"error": f"{type(exc).__name__}: {exc}", "error_type": "incomplete_generation"}


def error_response(exc: BaseException) -> JSONResponse:
    """A non-streaming error response; a 429 or 503 says when to retry (Retry-After)."""
    status, body = to_tgi_error(exc)
    headers = None
    if status in (429, 503):
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        retry_after_s = getattr(cause, "retry_after_s", None) or 1
        headers = {"Retry-After": str(math.ceil(retry_after_s))}
    return JSONResponse(body, status_code=status, headers=headers)


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route 404, wrong method 405) in TGI's shape."""
    error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
    body = {"error": str(exc.detail), "error_type": error_type}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def error_event(exc: BaseException) -> str:
    """The SSE event for an error after a stream has started (its 200 is already sent)."""
    _, body = to_tgi_error(exc)
    return f"data:{json.dumps(body, separators=(',', ':'))}\n\n"


def openai_error_response(exc: OpenAIError) -> JSONResponse:
    """An error response in OpenAI's shape."""
    body = {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
    return JSONResponse({"error": body}, status_code=exc.status_code)
