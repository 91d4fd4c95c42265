"""How ``itl_gap_2026-12-07.jsonl`` was made: where the 32-stream inter-token latency over HTTP goes.

Issue #23's peer run read 85.8 ms between tokens over HTTP (bfloat16, 32 streams x 128 tokens, one engine
thread) against a 68 ms decode step in process, and the 18 ms looked lost between the engine and the client.
This script measures both sides in one run, alternating, on the same machine state::

    PYTHONPATH=. python server/bench/results/peers/itl_gap.py --rounds 3 > itl_gap_<date>.jsonl

Each round: the engine in this process at each of ``--threads`` torch threads (1, the served setting; 2 is
the in-process bench's default on this machine, which is what the 68 ms was, and it collapses when another
process holds a core: ask for it on a quiet machine), then the served workload (`prefix-serve serve
--threads 1`, the peer bench's setting; server started once) with the CPU seconds its engine process, its
HTTP process and this client used during it. One JSON line each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from server.bench import peers
from server.bench.kv import _ids
from server.bench.offline import engine_decode_tokens_per_s
from server.bench.peer_servers import free_port
from server.engine.cpu_linear import resolve_dtype
from server.engine.engine import EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState

STREAMS, NEW_TOKENS, KV_BYTES = 32, 128, 2 << 30
REPO_ROOT = Path(__file__).resolve().parents[4]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(client: LocalEngineClient, threads: int) -> dict:
    torch.set_num_threads(threads)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    states = [RequestState(_ids(10 + i, 32), params, None) for i in range(STREAMS)]
    tps = engine_decode_tokens_per_s(client, states)
    return {"side": "in-process", "threads": threads, "decode_tok_s": round(tps, 1),
            "step_ms": round(STREAMS * 1e3 / tps, 1)}


def served(url: str, model: str, engine_pid: int, http_pid: int) -> dict:
    before = (_cpu_s(engine_pid), _cpu_s(http_pid), time.process_time())
    out = peers.streams(url, model, peers.Sizes(new_tokens=NEW_TOKENS, streams=STREAMS))
    wall = out["wall_s"]
    after = (_cpu_s(engine_pid), _cpu_s(http_pid), time.process_time())
    used = [a - b for a, b in zip(after, before)]
    return {"side": "served", "threads": 1, "output_tok_s": round(out["output_tokens_per_s"], 1),
            "itl_p50_ms": round(out["itl_p50_s"] * 1e3, 1), "wall_s": round(wall, 2),
            "engine_cpu_per_wall": round(used[0] / wall, 3), "http_cpu_per_wall": round(used[1] / wall, 3),
            "client_cpu_per_wall": round(used[2] / wall, 3)}


def _start_server(store: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--store-dir", store,
           "--threads", "1", "--max-batch-size", str(STREAMS + 1), "--kv-cache-bytes", str(KV_BYTES),
           "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1", help="in-process torch threads to time, comma-separated")
    args = parser.parse_args()
    base = load_base_model("default", resolve_dtype("auto", "cpu"), "cpu")
    client = LocalEngineClient(base, EngineConfig(max_batch_size=STREAMS + 1, kv_cache_bytes=KV_BYTES))
    in_process(client, 1)  # warm-up
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="itl-gap-store-") as store:
        server = _start_server(store, port)
        try:
            url = f"http://127.0.0.1:{port}"
            engine_pid = int(subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                            text=True, check=True).stdout.split()[0])
            model = peers.served_model_id(url)
            asyncio.run(peers._send(url, [(0.0, peers._body(model, _ids(3, 16), 4))]))  # warm-up
            for r in range(args.rounds):
                rows = [in_process(client, int(t)) for t in args.threads.split(",")]
                for row in [*rows, served(url, model, engine_pid, server.pid)]:
                    row.update(round=r, dtype=str(base.dtype).removeprefix("torch."),
                               load1=round(os.getloadavg()[0], 2),
                               time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
                    print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
