"""Run a real Prometheus with the scrape configuration that ships in docker/prometheus/.

    config = render_config(["127.0.0.1:8001", "127.0.0.1:8002"], interval="1s")
    with PrometheusServer(config, tmp_path / "prometheus") as prometheus:
        prometheus.query('sum(up{job="prefix-serve"})')

``render_config`` takes docker/prometheus/prometheus.yml and changes only what differs on this machine: the
prefix-serve job's targets (loopback addresses instead of compose service names), the scrape and rule
evaluation intervals (short, so a test sees data in seconds), and the rule files' paths (made absolute:
the shipped alerts.yml is loaded and evaluated as it is). Prometheus keeps its data in the test's folder
and listens on a free loopback port.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from tests.helpers.server_process import REPO_ROOT, free_port
from tests.helpers.system_programs import require_program, stop_process

if TYPE_CHECKING:
    from typing_extensions import Self

SHIPPED = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
JOB = "prefix-serve"

_live: set[PrometheusServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.stop()


def render_config(targets: list[str], interval: str = "1s") -> dict:
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str((SHIPPED.parent / path).resolve()) for path in config.get("rule_files", [])]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    (static,) = job["static_configs"]
    static["targets"] = list(targets)
    return config


class PrometheusServer:
    def __init__(self, config: dict, workdir: str | Path, startup_timeout: float = 60.0):
        self.config = config
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.binary = require_program("prometheus", "prometheus")
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        cmd = [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while Prometheus runs, closed by stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        _live.add(self)
        try:
            self.wait_until(self._ready, self.startup_timeout, "Prometheus ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}; log:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus /api/v1/{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        return self.api("query", query=expr)["result"]

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for: {what}; log:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        stop_process(proc, signal.SIGTERM, 20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
