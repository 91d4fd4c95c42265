"""The benchmark's real server process: `prefix-serve serve` on a free port with an empty store, and tasks
registered over HTTP as a user would upload them."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from prefixes.artifact import ModelShape, PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from server.bench import offline

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: str, args, max_batch_size: int, kv_cache_bytes: int | None = None,
            extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """A real `prefix-serve serve --model MODEL` process on a free port with an empty store; yields its
    URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as workdir:
        store, log_path = Path(workdir) / "store", Path(workdir) / "server.log"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--store-dir", str(store),
               "--model", model, "--dtype", args.dtype, "--device", args.device,
               "--max-batch-size", str(max_batch_size),
               "--max-step-tokens", str(max(args.max_step_tokens, max_batch_size)), "--log-level", "warning"]
        if kv_cache_bytes is not None:
            cmd += ["--kv-cache-bytes", str(kv_cache_bytes)]
        # The same compute threads as the in-process measurements (the server's own default leaves a core to
        # its HTTP process; the overload section measures that default by passing --threads 0 after this).
        cmd += ["--threads", str(args.threads or torch.get_num_threads())]
        cmd += extra_args
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(log_path, "wb") as log:  # a file, not a pipe: a pipe nobody reads would block the server
            server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the benchmark's server did not start:\n{tail}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)


def register_tasks(url: str, shape: ModelShape, count: int, virtual_tokens: int) -> list[str]:
    names = []
    with httpx.Client(timeout=120) as client:
        for i in range(count):
            kv = offline.random_prefix(shape, virtual_tokens, i)
            data = to_own_format(PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "bench"))
            name = f"task-{i}"
            response = client.post(f"{url}/prefixes/{name}", files=[("files", ("p.safetensors", data))])
            response.raise_for_status()
            names.append(name)
    return names
