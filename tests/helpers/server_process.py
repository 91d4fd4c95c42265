"""Run the real prefix-serve server (uvicorn) as a subprocess, for end-to-end HTTP tests.

    with ServerProcess(store_dir, log_path) as server:
        httpx.get(server.url + "/healthz")

``start()`` picks a free port, launches ``python -m server.cli serve ...`` with the test's own interpreter,
and waits until ``GET /healthz`` answers 200 (or the process dies, or the timeout passes: both raise with the
tail of the server's log). ``stop()`` sends SIGTERM (uvicorn's graceful shutdown, which also stops the
engine thread), then SIGKILL if it does not exit in time. The whole log goes to ``log_path``.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from typing_extensions import Self

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


_live: set[ServerProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    """A test run that dies without its fixture teardown must not leave servers behind."""
    for server in list(_live):
        server.stop()


class ServerProcess:
    def __init__(self, store_dir: str | os.PathLike, log_path: str | os.PathLike, *, model: str = "default",
                 host: str = "127.0.0.1", extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 startup_timeout: float = 240.0, stop_timeout: float = 30.0):
        self.store_dir = Path(store_dir)
        self.log_path = Path(log_path)
        self.model = model
        self.host = host
        # The suite's references (PEFT oracles, the in-process default model) are float32; a test that
        # wants another dtype (or "auto", the server's default) passes --dtype itself.
        dtype = () if "--dtype" in extra_args else ("--dtype", "float32")
        self.extra_args = (*dtype, *extra_args)
        self.env = env
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> ServerProcess:
        if self.running:
            raise RuntimeError("server already running")
        last_error: Exception | None = None
        for _ in range(3):  # a free port can be taken by someone else before the server binds it
            try:
                self._start_once(free_port(self.host))
                return self
            except ServerStartError as exc:
                last_error = exc
                if "address already in use" not in self.log_text().lower():
                    raise
        raise last_error  # type: ignore[misc]

    def _start_once(self, port: int) -> None:
        self.port = port
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", self.host, "--port", str(port),
               "--model", self.model, "--store-dir", str(self.store_dir), *self.extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as marker:
            marker.write(f"\n===== {' '.join(cmd)}\n".encode())
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - open while the server runs, closed by stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        _live.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerStartError(
                        f"server exited with code {code} during start-up; log:\n{self.log_tail()}")
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"server not healthy after {self.startup_timeout:.0f}s; log:\n{self.log_tail()}")
                time.sleep(0.2)

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL); returns its exit code."""
        proc, self.proc = self.proc, None
        _live.discard(self)
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            code = proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclass
class ServerSpec:
    """How a test module's ``server`` fixture (tests/conftest.py) starts its server: a module that needs more
    than the default overrides the ``server_spec`` fixture and returns one of these.

    ``auth`` is written to an auth file passed as ``--auth-file``; ``extra_args`` follow it. Each of
    ``uploads`` (task -> {file name: bytes}) is uploaded with ``upload_headers`` once the server is up.
    With ``clean_log``, teardown fails if the server logged a traceback."""

    model: str = "default"
    auth: dict | None = None
    extra_args: tuple[str, ...] = ()
    uploads: dict[str, dict[str, bytes]] = field(default_factory=dict)
    upload_headers: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 240.0
    stop_timeout: float = 30.0
    clean_log: bool = False
