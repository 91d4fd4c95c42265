"""Run a real nginx with the router configuration that ships in docker/nginx/, in front of real replicas.

    with NginxRouter(["127.0.0.1:8001", "127.0.0.1:8002"]) as router:
        httpx.get(router.url + "/healthz")

The configuration folder is a copy of docker/nginx/ with exactly two changes, both addresses: nginx.conf's
`listen 8080;` becomes a free loopback port, and upstream-servers.conf (compose's list of replica
services) becomes the given replica addresses. Everything else (hashing, njs, proxy settings) is the
shipped file. nginx runs in the foreground (``daemon off``) with its prefix (temp files), pid file and
logs in a temporary folder; ``stop()`` sends SIGQUIT (graceful) and then SIGKILL.
"""

from __future__ import annotations

import atexit
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.server_process import REPO_ROOT, free_port
from tests.helpers.system_programs import require_file, require_program, stop_process

if TYPE_CHECKING:
    from typing_extensions import Self

SHIPPED = REPO_ROOT / "docker" / "nginx"
LISTEN = re.compile(r"^(\s*)listen\s+8080;", re.MULTILINE)
JS_MODULE = re.compile(r"^load_module\s+(\S+);", re.MULTILINE)

_live: set[NginxRouter] = set()


@atexit.register
def _stop_leftovers() -> None:
    for router in list(_live):
        router.stop()


def render_config(folder: Path, port: int, upstreams: list[str]) -> Path:
    """Copy docker/nginx/ into ``folder`` with the listen port and the replica list replaced."""
    shutil.copytree(SHIPPED, folder, dirs_exist_ok=True)
    conf = (SHIPPED / "nginx.conf").read_text()
    conf, count = LISTEN.subn(rf"\g<1>listen 127.0.0.1:{port};", conf)
    if count != 1:
        raise AssertionError("docker/nginx/nginx.conf should have exactly one `listen 8080;`")
    (folder / "nginx.conf").write_text(conf)
    (folder / "upstream-servers.conf").write_text("".join(f"server {address};\n" for address in upstreams))
    return folder / "nginx.conf"


class NginxRouter:
    def __init__(self, upstreams: list[str], startup_timeout: float = 15.0):
        self.upstreams = list(upstreams)
        self.startup_timeout = startup_timeout
        self.binary = require_program("nginx", "nginx")
        conf = (SHIPPED / "nginx.conf").read_text()
        for module in JS_MODULE.findall(conf):
            require_file(module, "libnginx-mod-http-js")
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    @property
    def error_log(self) -> Path:
        return self.folder / "error.log"

    def start(self) -> NginxRouter:
        for _ in range(3):  # a free port can be taken by someone else before nginx binds it
            # Not pytest's tmp_path: nginx's workers drop root for an unprivileged user, which must reach the
            # temp folders nginx creates under its prefix (pytest's folders are private to root).
            self.folder = Path(tempfile.mkdtemp(prefix="prefix-serve-nginx-"))
            self.folder.chmod(0o755)
            self.port = free_port()
            conf = render_config(self.folder / "conf", self.port, self.upstreams)
            cmd = [self.binary, "-p", f"{self.folder}/", "-c", str(conf), "-e", str(self.error_log),
                   "-g", f"daemon off; pid {self.folder}/nginx.pid;"]
            # the config logs requests to /dev/stdout; open while nginx runs, closed by stop()
            self._log = open(self.access_log, "ab")  # noqa: SIM115
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT)
            _live.add(self)
            if self._wait_listening():
                return self
            errors = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
            self.stop()
            if "Address already in use" not in errors:
                raise RuntimeError(f"nginx did not start; error log:\n{errors[-3000:]}")
        raise RuntimeError("nginx could not bind a free port")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        stop_process(proc, signal.SIGQUIT, 10)  # SIGQUIT: nginx's graceful shutdown
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
