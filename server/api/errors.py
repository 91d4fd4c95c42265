"""Error responses: what each route documents in the OpenAPI schema, and the one mapping of domain errors
(:mod:`server.errors`, the store's) to HTTP statuses and headers.

Routes declare the error statuses they really give with ``responses=errors.responses(...)`` (FastAPI adds
422 for request validation itself). The bodies are FastAPI's ``{"detail": ...}`` everywhere except under
``/v1``, where they are OpenAI's ``{"error": {...}}`` (``openai=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import isawaitable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from prefixes.keys import InvalidTaskName
from prefixes.store import QuotaExceeded, StorageFull, StoreReadOnly, StoreUnavailable
from server.errors import (
    Forbidden,
    TooManyInFlight,
    Unauthenticated,
    UnknownTask,
    UnknownTenant,
)


class ErrorDetail(BaseModel):
    detail: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
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
    507: (("The task store is out of room: its disk is full, or Redis is out of memory; the message says "
           "which. Nothing of the upload was kept and earlier tasks are intact."), None),
}


def responses(*statuses: int, openai: bool = False, text_route: bool = False) -> dict[int | str, dict]:
    """The ``responses=`` of a route decorator documenting ``statuses`` (``openai``: OpenAI's error shape).
    ``text_route``: the route answers text, its errors JSON (FastAPI would document them as its text)."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        description, headers = _DESCRIPTIONS[status]
        out[status] = {"model": OpenAIError if openai else ErrorDetail, "description": description}
        if text_route:
            out[status] = {"description": description, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{ErrorDetail.__name__}"}}}}
        if headers:
            out[status]["headers"] = headers
    return out


def _retry_after(exc: Any) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after)}


def _bearer_challenge(exc: Any) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"}


# Domain error -> (status, the headers it is sent with). Subclasses map as their base does.
STATUSES: dict[type[Exception], tuple[int, Callable[[Any], dict[str, str]] | None]] = {
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
