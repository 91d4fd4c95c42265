"""The gate every HTTP request passes before any route sees it (one ASGI middleware, no body buffering).

In order, from the headers alone:

1. a request id: the client's ``x-request-id`` when it is a sane token, else a fresh one; it is echoed on
   the response and logged with the request's outcome;
2. authentication (with ``--auth-file``): a route that is not public answers 401 before a byte of the body is
   read, so an unauthenticated client cannot make the server parse, buffer or validate anything;
3. a body cap: ``Content-Length`` above the route's limit is a 413 at once; a chunked body is counted as it
   streams in and refused with 413 as soon as it passes the limit. Uploads (``POST /prefixes/{task}``) are
   capped at ``--max-upload-bytes`` plus room for the multipart framing, every other body at
   ``--max-request-bytes``.

What the client sends after a refusal is discarded by the HTTP server as it arrives, never kept.
Errors are rendered by the app's own HTTPException handler, so ``/v1`` callers get OpenAI's error shape.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import Principal
from server.config import Settings

log = logging.getLogger("server.requests")

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept when it is 1-128 characters of this set (UUIDs, ULIDs, trace ids); anything else
# (control characters, spaces, very long values) could corrupt logs, so a fresh id replaces it.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
UPLOAD_PATH = re.compile(r"/prefixes/[^/]+")
MULTIPART_SLACK = 64 << 10  # boundaries and part headers around the uploaded files
HEALTH_PATHS = frozenset({"/healthz", "/health"})
METRICS_PATHS = frozenset({"/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Metrics carry every tenant's name as a label: with keys, only admin keys read them (or --public-metrics).
ADMIN_PATHS = METRICS_PATHS

ASGIResponse = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorRenderer = Callable[[Request, HTTPException], Awaitable[ASGIResponse]]


@dataclass(frozen=True, slots=True)
class GatePolicy:
    public_paths: frozenset[str]  # answered without a key even when keys are required
    max_request_bytes: int
    max_upload_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> GatePolicy:
        public = HEALTH_PATHS
        if settings.public_metrics:
            public |= METRICS_PATHS
        if settings.public_docs:
            public |= DOCS_PATHS
        return cls(public, settings.max_request_bytes, settings.max_upload_bytes + MULTIPART_SLACK)

    def body_limit(self, method: str, path: str) -> int:
        is_upload = method == "POST" and UPLOAD_PATH.fullmatch(path) is not None
        return self.max_upload_bytes if is_upload else self.max_request_bytes


def request_id(headers: Headers) -> str:
    sent = headers.get(REQUEST_ID_HEADER)
    return sent if sent is not None and REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def body_too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"The request body exceeds {limit} bytes, this server's limit for this "
                         "route (--max-request-bytes for JSON, --max-upload-bytes for uploads); send a "
                         "smaller one.")


class RequestGate:
    """See the module docstring. ``authenticate(authorization header)`` returns the caller or raises a 401
    HTTPException; ``render_error`` turns an HTTPException into a response (the app's handler)."""

    def __init__(self, app: ASGIApp, *, policy: GatePolicy,
                 authenticate: Callable[[Scope, str | None], Principal], render_error: ErrorRenderer):
        self.app = app
        self.policy = policy
        self.authenticate = authenticate
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        rid = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500  # what the log says when the app fails before answering
        principal: Principal | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            try:
                allowed = _methods_of_path(scope)
                if allowed is not None and scope["method"] not in allowed:
                    # before authentication: which methods a path has is in the public schema anyway
                    raise HTTPException(405, f"{scope['method']} is not allowed on {scope['path']}: use "
                                        f"{', '.join(sorted(allowed))}.",
                                        headers={"Allow": ", ".join(sorted(allowed))})
                if scope["path"] not in self.policy.public_paths:
                    principal = self.authenticate(scope, headers.get("authorization"))
                    scope["state"]["principal"] = principal
                    if scope["path"] in ADMIN_PATHS and not principal.is_admin:
                        raise HTTPException(403, f"{scope['path']} is for admin keys (it names every "
                                            "tenant).")
                limit = self.policy.body_limit(scope["method"], scope["path"])
                length = _content_length(headers)
                if length is not None and length > limit:
                    raise body_too_large(limit)
            except HTTPException as exc:  # refused from the headers: the body is never read
                response = await self.render_error(Request(scope), exc)
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, _counting(receive, limit), send_with_id)
        finally:
            tenant = principal.tenant if principal is not None else "-"
            elapsed_ms = 1000 * (time.perf_counter() - started)
            log.info("%s %s %s -> %d in %.1f ms (tenant %s, request %s)", scope["method"], scope["path"],
                     scope.get("http_version", ""), status, elapsed_ms, tenant, rid)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def _methods_of_path(scope: Scope) -> set[str] | None:
    """The methods the app's routes take on this path, all routes that share it together (Starlette's own
    405 names only the first route's methods), or None when no route has the path. Asked of the routes
    themselves, method by method: included routers are not flat lists of routes."""
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
    methods = {method for method in _METHODS
               if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)}
    return methods or None


def _counting(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises 413 once more than ``limit`` body bytes have arrived (FastAPI re-raises an
    HTTPException from body reading as it is, so the app's handler renders it)."""
    total = 0

    async def receive_counted() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise body_too_large(limit)
        return message

    return receive_counted
