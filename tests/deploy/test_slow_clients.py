"""Slow clients (slowloris) against the shipped router: connections that never finish their headers are
closed by nginx's client_header_timeout (the replicas' uvicorn has no header-read timeout); with nginx's
default (60 s) they would all still be open. Loopback only, bounded in count and time."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers.nginx_server import NginxRouter
from tests.helpers.server_process import free_port

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

SLOW_CLIENTS = 50
HEADER_TIMEOUT_S = 10  # docker/nginx/nginx.conf: client_header_timeout


def test_connections_that_never_finish_their_headers_are_closed(tmp_path):
    # No replica is needed: nginx reads the whole header before it proxies anything.
    with NginxRouter([f"127.0.0.1:{free_port()}"]) as router:
        host, port = router.url.removeprefix("http://").split(":")
        slow = []
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            slow.append(sock)
        started = time.monotonic()
        closed: dict[int, float] = {}
        while len(closed) < SLOW_CLIENTS and time.monotonic() - started < HEADER_TIMEOUT_S + 20:
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                sock.settimeout(0.05)
                try:
                    if sock.recv(4096) == b"":
                        closed[i] = time.monotonic() - started
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    closed[i] = time.monotonic() - started
        for sock in slow:
            sock.close()
        assert len(closed) == SLOW_CLIENTS, f"{SLOW_CLIENTS - len(closed)} slow connections still open"
        assert max(closed.values()) < HEADER_TIMEOUT_S + 5, max(closed.values())
        assert min(closed.values()) > HEADER_TIMEOUT_S - 2  # closed by the timeout, not refused at once
