"""Error responses: what each route documents in the OpenAPI schema, and the one mapping of the store's
domain errors to HTTP.

Routes declare the error statuses they really give with ``responses=errors.responses(...)`` (FastAPI adds
422 for request validation itself). The bodies are FastAPI's ``{"detail": ...}`` everywhere except under
``/v1``, where they are OpenAI's ``{"error": {...}}`` (``openai=True``).
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixes.store import QuotaExceeded, StoreUnavailable


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
    404: ("No such task visible to this key.", None),
    409: ("Conflicts with the current state.", None),
    413: ("The request body is over --max-request-bytes (JSON) or --max-upload-bytes (uploads).", None),
    429: ("Over the tenant's task, byte or concurrent-request quota.", _RETRY_AFTER),
    503: ("Temporarily unable: the waiting queue is full, the request's deadline passed in the queue, the "
          "server is draining or its engine is down, or the task is not on this replica and Redis is "
          "unreachable.", _RETRY_AFTER),
}


def responses(*statuses: int, openai: bool = False) -> dict[int | str, dict]:
    """The ``responses=`` of a route decorator documenting ``statuses`` (``openai``: OpenAI's error shape)."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        description, headers = _DESCRIPTIONS[status]
        out[status] = {"model": OpenAIError if openai else ErrorDetail, "description": description}
        if headers:
            out[status]["headers"] = headers
    return out


QUOTA_RETRY_AFTER_S = 1  # as for the other per-tenant limits (server.tasks.RETRY_AFTER_S)


def add_store_error_handlers(app: FastAPI) -> None:
    """StoreUnavailable -> 503 and QuotaExceeded -> 429, both with Retry-After, rendered by the app's
    HTTPException handler (so /v1 callers get OpenAI's shape)."""

    async def render(request: Request, refused: HTTPException):
        handler = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)
        return await handler(request, refused)

    async def unavailable(request: Request, exc: StoreUnavailable):
        return await render(request, HTTPException(503, str(exc),
                                                   headers={"Retry-After": str(exc.retry_after)}))

    async def over_quota(request: Request, exc: QuotaExceeded):
        return await render(request, HTTPException(429, str(exc),
                                                   headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)}))

    app.add_exception_handler(StoreUnavailable, unavailable)
    app.add_exception_handler(QuotaExceeded, over_quota)
