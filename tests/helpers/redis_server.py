"""Run a real ``redis-server`` for a test: a free loopback port, its own folder, no persistence.

    with RedisServer(tmp_path / "redis") as server:
        redis.Redis.from_url(server.url).ping()
        server.stop()    # an outage (the data is gone: nothing is saved)
        server.start()   # back on the same port, empty
        server.pause()   # SIGSTOP: a hung Redis (connections stay open, nothing answers)
        server.resume()

``redis-server`` must be on PATH (``make install`` installs it on Debian when run as root).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.server_process import free_port

if TYPE_CHECKING:
    from typing_extensions import Self

_live: set[RedisServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.stop()


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: the Redis tests start real ones. Run `make install` "
                           "(as root on Debian it installs the redis-server package) or `apt-get install "
                           "redis-server`.")
    return binary


class RedisServer:
    def __init__(self, workdir: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 10.0, extra_args: tuple[str, ...] = ()):
        """``extra_args``: more redis-server options, e.g. ``("--maxmemory", "4mb")``."""
        self.workdir = Path(workdir)
        self.extra_args = tuple(extra_args)
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._paused = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis-server not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start (or restart on the same port) an empty server and wait until it answers PING."""
        if self.running:
            raise RuntimeError("redis-server already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", self.host,
               "--dir", str(self.workdir), "--save", "", "--appendonly", "no", "--daemonize", "no",
               "--logfile", str(self.log_path), "--protected-mode", "no", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        self._paused = False
        _live.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start; log:\n{log}")
            time.sleep(0.02)
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a clean shutdown) and wait until it is gone."""
        proc, self.proc = self.proc, None
        _live.discard(self)
        if proc is not None and proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
        self._paused = False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers until ``resume``."""
        assert self.running
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.running
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class TcpProxy:
    """A loopback TCP forwarder to a real server that can be cut: a network partition between one client
    (e.g. one replica) and Redis while others still reach it. ``cut()`` drops every open connection and
    closes new ones as soon as they arrive; ``heal()`` forwards again."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1"):
        import threading

        self._threading = threading
        self.target = (target_host, target_port)
        self.host = host
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    @classmethod
    def to(cls, server: RedisServer) -> TcpProxy:
        return cls(server.host, server.port)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self) -> None:
        self._cut = True
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._drop(s)

    def heal(self) -> None:
        self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
