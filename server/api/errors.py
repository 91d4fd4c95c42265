"""Error responses: what each route documents in the OpenAPI schema, and the one mapping of domain errors
(:mod:`server.errors`, the store's) to HTTP statuses and headers.

Routes declare the error statuses they really give with ``responses=errors.responses(...)`` (FastAPI adds
422 for request validation itself). The bodies are FastAPI's ``{"detail": ...}`` everywhere except under
``/v1``, where they are OpenAI's ``{"error": {...}}`` (``openai=True``): :class:`OpenAIError` names the
parameter at fault, and :func:`add_openai_error_handlers` writes every HTTP and validation error there in
that shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from inspect import isawaitable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from prefixes.keys import InvalidTaskName
from prefixes.store import QuotaExceeded, StorageFull, StoreReadOnly, StoreUnavailable
from server.engine.engine import RequestInvalid
from server.errors import (
    RETRY_AFTER_S,
    Forbidden,
    GenerationFailed,
    GenerationUnavailable,
    TooManyInFlight,
    Unauthenticated,
    UnknownTask,
    UnknownTenant,
)
from server.frontend.admission import EngineOverloaded, EngineUnavailable


class OpenAIError(HTTPException):
    """An HTTP error that also says which parameter is at fault and OpenAI's machine-readable ``code``."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(status_code, message)
        self.param, self.code = param, code


def error_body(message: str, type_: str = "server_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape (also used for errors inside any stream, where the status is already sent)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    detail: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer"}}}
_DESCRIPTIONS = {
    400: ("A parameter, task name or artifact is invalid; the message says what to fix.", None),
    401: ("No valid API key (with --auth-file): send 'Authorization: Bearer <key>'.",
          {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    403: ("The key may not do this (only admin keys act on another tenant's tasks or read metrics).", None),
    404: ("No such task visible to this key (or, for an admin's tenant parameter, no such tenant).", None),
    409: ("Conflicts with the current state.", None),
    413: ("The request body is over --max-request-bytes (JSON) or --max-upload-bytes (uploads).", None),
    429: (("Over the tenant's concurrent-request quota (with Retry-After), or its stored task or byte quota "
          "(without: delete a task first)."), _RETRY_AFTER),
    503: (("Temporarily unable: the waiting queue is full, the request's deadline passed in the queue, the "
           "server is draining, its engine process is being replaced (Retry-After: until it should serve) "
           "or down for good (no Retry-After), or the task is not on this replica and Redis is "
           "unreachable; or the task store is read-only, so uploads and deletes are refused (no "
           "Retry-After: an operator must make it writable)."), _RETRY_AFTER),
    500: ("The engine failed the request (an internal error); the message says what happened.", None),
    507: (("The task store is out of room: its disk is full, or Redis is out of memory; the message says "
           "which. Nothing of the upload was kept and earlier tasks are intact."), None),
}


def responses(*statuses: int, openai: bool = False, text_route: bool = False) -> dict[int | str, dict]:
    """The ``responses=`` of a route decorator documenting ``statuses`` (``openai``: OpenAI's error shape).
    ``text_route``: the route answers text, its errors JSON (FastAPI would document them as its text)."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        description, headers = _DESCRIPTIONS[status]
        out[status] = {"model": OpenAIErrorResponse if openai else ErrorDetail, "description": description}
        if text_route:
            out[status] = {"description": description, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{ErrorDetail.__name__}"}}}}
        if headers:
            out[status]["headers"] = headers
    return out


def _retry_after(exc: Any) -> dict[str, str] | None:
    # None: retrying cannot help (an engine down for good), so no Retry-After is sent
    return {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None


def _retry_soon(exc: Any) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


def _bearer_challenge(exc: Any) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"}


# Domain error -> (status, the headers it is sent with). Subclasses map as their base does.
STATUSES: dict[type[Exception], tuple[int, Callable[[Any], dict[str, str] | None] | None]] = {
    InvalidTaskName: (400, None),
    UnknownTenant: (404, None),  # no tenant of that name on this server (none at all without --auth-file)
    Unauthenticated: (401, _bearer_challenge),
    Forbidden: (403, None),
    UnknownTask: (404, None),
    TooManyInFlight: (429, _retry_after),
    # the store's: over stored tasks or bytes; no Retry-After, waiting frees nothing (a delete does)
    QuotaExceeded: (429, None),
    StoreUnavailable: (503, _retry_after),
    StoreReadOnly: (503, None),  # a read-only disk or Redis replica: not fixed by retrying soon
    StorageFull: (507, None),  # disk full (ENOSPC) or Redis out of memory: room must be made first
    # the engine's, from the front end: a request that can never fit as sent; a full waiting queue; an
    # engine that is gone, being replaced or draining; a sequence it failed (lost: 503, broken: 500)
    RequestInvalid: (400, None),
    EngineOverloaded: (503, _retry_soon),
    EngineUnavailable: (503, _retry_after),
    GenerationUnavailable: (503, _retry_after),  # before its base class: the first match wins
    GenerationFailed: (500, None),
}


def as_http(exc: Exception) -> HTTPException:
    """The HTTP refusal a domain error of :data:`STATUSES` is sent as; its message is the detail."""
    for kind, (status, headers) in STATUSES.items():
        if isinstance(exc, kind):
            return HTTPException(status, str(exc), headers=headers(exc) if headers else None)
    raise TypeError(f"{type(exc).__name__} is not a domain error with an HTTP status")


def add_domain_error_handlers(app: FastAPI) -> None:
    """Each domain error of :data:`STATUSES` is answered as :func:`as_http` says, rendered by the app's
    HTTPException handler (so /v1 callers get OpenAI's shape)."""

    async def refuse(request: Request, exc: Exception) -> Response:
        handler = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)
        response = handler(request, as_http(exc))
        return await response if isawaitable(response) else response

    for kind in STATUSES:
        app.add_exception_handler(kind, refuse)


# ---------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape, for /v1 only


def _is_openai_route(request: Request) -> bool:
    return request.url.path == "/v1" or request.url.path.startswith("/v1/")


_ERROR_TYPES = {401: ("authentication_error", "invalid_api_key"), 403: ("permission_error", None),
                429: ("rate_limit_error", "rate_limit_exceeded")}


async def _http_error(request: Request, exc: StarletteHTTPException):
    if not _is_openai_route(request):
        return await http_exception_handler(request, exc)
    status = exc.status_code
    default = ("server_error" if status >= 500 else "invalid_request_error", None)
    type_, code = _ERROR_TYPES.get(status, default)
    body = error_body(str(exc.detail), type_, getattr(exc, "code", None) or code, getattr(exc, "param", None))
    return JSONResponse(body, status_code=status, headers=exc.headers)


def _encodable(value):
    """``value`` with non-finite floats as strings: a 422 quoting a NaN input must still be valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    if isinstance(value, str):  # a lone surrogate cannot be written as UTF-8: escaped instead
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


SURROGATE = ("the request holds a lone UTF-16 surrogate (such as \\ud800) that is not a Unicode character: "
             "send valid text.")


async def _validation_error(request: Request, exc: RequestValidationError):
    if any(error.get("type") == "string_unicode" for error in exc.errors()):
        # strict bodies refuse a lone surrogate in validation; answered as the routes answer one in text
        if _is_openai_route(request):
            return JSONResponse(error_body(SURROGATE, "invalid_request_error", None, None), status_code=400)
        return JSONResponse({"detail": SURROGATE}, status_code=400)
    if not _is_openai_route(request):
        return JSONResponse({"detail": _encodable(jsonable_encoder(exc.errors()))}, status_code=422)
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        param, message = None, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    else:
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    # OpenAI answers every malformed request with 400, where FastAPI would say 422
    return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)


def add_openai_error_handlers(app: FastAPI) -> None:
    """Under ``/v1``, HTTP errors and validation errors in OpenAI's shape (a malformed request is a 400, as
    OpenAI answers it); elsewhere FastAPI's own, except that a lone surrogate is a 400 everywhere."""
    # Starlette types a handler as taking any Exception, though it calls each with its own class only
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
