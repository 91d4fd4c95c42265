"""Domain errors become HTTP in one place (server/api/errors.py): each keeps its message and gets today's
status and headers, every one is documented for the OpenAPI schema, and no module outside the HTTP layer
raises an HTTPException itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from prefixes.keys import InvalidTaskName
from prefixes.store import QuotaExceeded, StorageFull, StoreReadOnly, StoreUnavailable
from server.api import errors
from server.engine.engine import ContextTooLong, RequestInvalid
from server.errors import (
    Forbidden,
    GenerationFailed,
    GenerationUnavailable,
    TooManyInFlight,
    Unauthenticated,
    UnknownTask,
    UnknownTenant,
)
from server.frontend.admission import EngineOverloaded, EngineUnavailable

SERVER = Path(errors.__file__).resolve().parents[1]
# The HTTP layer: the routes, the request gate and the app that wires them.
HTTP_LAYER = ("api/", "middleware.py", "app.py")


@pytest.mark.parametrize(("error", "status", "headers"), [
    (InvalidTaskName("Task name 'a b' is invalid"), 400, None),
    (UnknownTenant("tenant='x' is not a tenant of this server"), 404, None),
    (Unauthenticated("Invalid API key."), 401, {"WWW-Authenticate": "Bearer"}),
    (Forbidden("Only admin keys may act on another tenant's tasks."), 403, None),
    (UnknownTask("Unknown task 'x'"), 404, None),
    (TooManyInFlight("Tenant 'acme' has 2 requests in flight", retry_after=1), 429, {"Retry-After": "1"}),
    (QuotaExceeded("Tenant 'acme' already has 3 tasks, its quota is 3: delete one first."), 429, None),
    (StoreUnavailable("acme/x", retry_after=3), 503, {"Retry-After": "3"}),
    (StoreReadOnly("The server's task store (its --store-dir disk) is read-only"), 503, None),
    (StorageFull("The server's task store (its --store-dir disk) is full"), 507, None),
    (RequestInvalid("a stop string may not be empty"), 400, None),
    (ContextTooLong("the prompt has 9000 tokens; the context is 8192"), 400, None),
    (EngineOverloaded("the waiting queue is full (64 sequences)"), 503, {"Retry-After": "1"}),
    (EngineUnavailable("a new engine process is starting", retry_after=4), 503, {"Retry-After": "4"}),
    (EngineUnavailable("the engine process is down for good", retry_after=None), 503, None),
    (GenerationUnavailable("the engine process exited", retry_after=3), 503, {"Retry-After": "3"}),
    (GenerationFailed("the engine failed the sequence"), 500, None),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_each_domain_error_has_its_status_headers_and_message(error, status, headers):
    refused = errors.as_http(error)
    assert (refused.status_code, refused.headers, refused.detail) == (status, headers, str(error))


def test_every_mapped_status_is_documented():
    for status, _ in errors.STATUSES.values():
        assert status in errors.responses(status)


def test_a_non_domain_error_is_not_mapped():
    with pytest.raises(TypeError, match="ValueError"):
        errors.as_http(ValueError("plain"))


def test_only_the_http_layer_raises_http_exceptions():
    offenders = []
    for path in sorted(SERVER.rglob("*.py")):
        where = path.relative_to(SERVER).as_posix()
        if where.startswith(HTTP_LAYER):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any(a.name == "HTTPException" for a in node.names):
                offenders.append(f"{where}:{node.lineno}")
    assert offenders == []
