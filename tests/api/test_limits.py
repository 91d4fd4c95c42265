"""The request gate over real HTTP: keys are checked from the headers before any body is read, bodies are
capped as they stream in, and every response carries a request id. The server's resident memory must not
follow the size of a body it refuses."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest

from tests.helpers.server_process import ServerSpec

pytestmark = pytest.mark.slow

KEY = "limits-key"
ADMIN = "limits-admin"
BIG = 200 << 20  # what a hostile client streams at the server
CHUNK = 1 << 20
RSS_SLACK = 48 << 20  # allocator noise; buffering the body would cost BIG


@pytest.fixture(scope="module")
def server_spec() -> ServerSpec:
    return ServerSpec(auth={"admin_keys": [ADMIN], "tenants": {"acme": {"api_keys": [KEY]}}},
                      extra_args=("--public-metrics",))


def rss(server) -> int:
    """Resident memory of the server process, in bytes (VmRSS)."""
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def stream_body(server, path: str, headers: dict[str, str], total: int, chunked: bool = True):
    """POST ``total`` bytes to ``path`` in 1 MiB pieces over a raw socket, reading the response whenever it
    comes (a refusal arrives long before the body ends); samples the server's RSS as it goes.

    Returns (status, bytes sent, peak RSS seen). The server may close the connection after refusing (its
    keep-alive timeout); what was sent until then is reported."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {server.host}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    sock = socket.create_connection((server.host, server.port), timeout=30)
    response, sent, peak = b"", 0, rss(server)
    piece = (f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n") if chunked else b"x" * CHUNK
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while sent < total:
            sock.sendall(piece)
            sent += CHUNK
            if sent % (8 * CHUNK) == 0:
                peak = max(peak, rss(server))
            while select.select([sock], [], [], 0)[0]:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    peak = max(peak, rss(server))
    assert response.startswith(b"HTTP/1.1 "), f"no response after {sent} bytes: {response[:200]!r}"
    return int(response.split(b" ", 2)[1]), sent, peak


@pytest.mark.parametrize("case",
                         ["no key", "wrong key", "over the limit, chunked", "over the limit, declared"])
def test_refused_bodies_do_not_grow_memory(server, case):
    httpx.post(f"{server.url}/generate", headers={"Authorization": f"Bearer {KEY}"},
               json={"prompt": "warm up", "max_new_tokens": 2}, timeout=120)
    before = rss(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    if case == "no key":
        headers = {}
    elif case == "wrong key":
        headers = {"Authorization": "Bearer nope"}
    start = time.perf_counter()
    status, sent, peak = stream_body(server, "/generate", headers, BIG,
                                     chunked=case != "over the limit, declared")
    elapsed = time.perf_counter() - start
    assert status == (413 if case.startswith("over") else 401)
    assert sent >= BIG // 2, \
        f"only {sent} bytes sent: the server cut the upload before it could show anything"
    assert peak - before < RSS_SLACK, \
        f"{case}: RSS grew by {(peak - before) >> 20} MiB while {sent >> 20} MiB were streamed " \
        f"({elapsed:.1f}s)"


def test_invalid_json_without_a_key_is_401(server):
    for path in ("/generate", "/v1/completions", "/prefixes/x"):
        r = httpx.post(f"{server.url}{path}", content=b"{not json",
                       headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    # with a key the same body is the usual validation error (OpenAI's 400 on /v1)
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_every_route_but_health_needs_a_key(server):
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # --public-metrics
    for path in ("/docs", "/redoc", "/openapi.json", "/prefixes", "/v1/models", "/no-such-route"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401, (path, r.status_code)
    assert httpx.get(f"{server.url}/openapi.json",
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_oversized_json_is_413_in_the_routes_error_shape(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"prompt": "x" * (5 << 20)})  # over the 4 MiB default
    r = httpx.post(f"{server.url}/generate", content=body, headers=headers)
    assert r.status_code == 413 and "4194304 bytes" in r.json()["detail"]
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers)
    assert r.status_code == 413 and "4194304 bytes" in r.json()["error"]["message"]
    # a long prompt under the cap reaches the route (and its own context-length check)
    r = httpx.post(f"{server.url}/generate", json={"prompt": "hello " * 20000, "max_new_tokens": 1},
                   headers=headers)
    assert r.status_code == 400 and "context" in r.json()["detail"]


def test_request_ids(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{server.url}/prefixes", headers={**headers, "x-request-id": "trace-42.a:b"})
    assert r.headers["x-request-id"] == "trace-42.a:b"
    generated = {httpx.get(f"{server.url}/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3 and all(len(g) == 32 for g in generated)
    for bad in ("has space", "x" * 129, "semi;colon"):
        sent = httpx.get(f"{server.url}/prefixes", headers={**headers, "x-request-id": bad})
        assert sent.headers["x-request-id"] not in (bad, "") and len(sent.headers["x-request-id"]) == 32
    assert httpx.get(f"{server.url}/prefixes").headers["x-request-id"]  # on refusals too
    deadline = time.monotonic() + 5
    while "request trace-42.a:b" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in server.log_text().splitlines() if "request trace-42.a:b" in ln)
    assert "GET /prefixes" in line and "-> 200" in line and "tenant acme" in line
