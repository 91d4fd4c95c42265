"""The request gate's decisions as pure functions: which id a request gets, which routes are public, which
body limit applies. (tests/api/test_limits.py drives the same gate over real HTTP.)"""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from server.config import Settings
from server.middleware import MULTIPART_SLACK, GatePolicy, request_id


@pytest.mark.parametrize("sent, kept", [
    ("abc-123", True), ("0f8e-uuid:trace/1+x=", True), ("x" * 128, True),
    ("", False), ("x" * 129, False), ("two words", False), ("new\nline", False), ("é", False), (None, False),
])
def test_request_id_keeps_only_sane_client_ids(sent, kept):
    headers = Headers({} if sent is None else {"x-request-id": sent})
    rid = request_id(headers)
    assert (rid == sent) is kept
    if not kept:
        assert len(rid) == 32 and rid != request_id(headers)  # fresh each time


@pytest.mark.parametrize("metrics, docs, public", [
    (False, False, {"/healthz", "/health"}),
    (True, False, {"/healthz", "/health", "/metrics"}),
    (False, True, {"/healthz", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}),
])
def test_public_routes_follow_the_options(metrics, docs, public):
    assert GatePolicy.from_settings(Settings(public_metrics=metrics, public_docs=docs)).public_paths == public


@pytest.mark.parametrize("method, path, upload", [
    ("POST", "/prefixes/summary", True), ("POST", "/generate", False), ("POST", "/v1/completions", False),
    ("DELETE", "/prefixes/summary", False), ("POST", "/prefixes/summary/artifact", False),
])
def test_uploads_have_their_own_body_limit(method, path, upload):
    policy = GatePolicy.from_settings(Settings(max_request_bytes=1000, max_upload_bytes=5000))
    assert policy.body_limit(method, path) == (5000 + MULTIPART_SLACK if upload else 1000)


def test_the_request_limit_must_be_positive():
    with pytest.raises(ValueError, match="max_request_bytes"):
        Settings(max_request_bytes=0)
