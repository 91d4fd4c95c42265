"""`prefix-serve bench --url URL`: the load generator against a server that is already running.

Nothing is started or registered: the load goes to the tasks named with ``--tasks`` (or to the base model),
at each concurrency of ``--sweep``, for ``--duration`` seconds each (or a fixed number of requests), and the
table is the benchmark's HTTP table: throughput, time to first token, inter-token latency, end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx

from server.bench.load import LoadSpec, run_load
from server.bench.report import latency_cells


class RemoteError(RuntimeError):
    pass


def check_server(url: str, tasks: list[str], headers: dict[str, str]) -> dict:
    """The server's /healthz answer; refuses a server that is not up, or tasks it does not serve."""
    try:
        health = httpx.get(f"{url}/healthz", timeout=10)
    except httpx.TransportError as exc:
        raise RemoteError(f"no server answers at {url} ({exc}); start one, or check --url") from exc
    if health.status_code != 200:
        raise RemoteError(f"{url}/healthz answered {health.status_code}: the server is not ready")
    for task in tasks:
        found = httpx.get(f"{url}/prefixes/{task}", headers=headers, timeout=10)
        if found.status_code != 200:
            raise RemoteError(f"task {task!r}: {url} answered {found.status_code} ({found.text[:200]}); "
                              "upload it first, or pass the names of tasks it serves with --tasks "
                              "(none: the base model)")
    return health.json()


def run_remote(args: argparse.Namespace) -> dict:
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    names = list(args.tasks or [])
    health = check_server(url, names, headers)
    rows = []
    for c in args.sweep:
        spec = LoadSpec(requests=None if args.duration else max(4 * c, 8), duration=args.duration,
                        concurrency=c, tasks=tuple(names) or (None,), mix=args.mix,
                        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
        rows.append({"concurrency": c, "load": asyncio.run(run_load(url, spec, headers))})
    return {"url": url, "model": health.get("model"), "tasks": names, "mix": args.mix,
            "duration": args.duration, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "sweep": rows}


def render_remote(result: dict) -> str:
    tasks = f"{len(result['tasks'])} tasks ({result['mix']} mix)" if result["tasks"] else "the base model"
    length = f"{result['duration']:g} s per concurrency" if result["duration"] else "4 requests per client"
    lines = [(f"**{result['url']}** ({result.get('model') or 'model not reported'}): {tasks}; prompt "
              f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens; {length}"), "",
             ("| concurrency | requests (failed) | req/s | tok/s (all busy) | TTFT p50 / p99 (s) "
              "| ITL p50 / p99 (ms) | e2e p50 / p90 / p99 (s) |"), "|---|---|---|---|---|---|---|"]
    for row in result["sweep"]:
        m = row["load"]
        busy = f" ({m['steady_token_throughput']:.1f})" if m.get("steady_token_throughput") else ""
        cells = [str(row["concurrency"]), f"{m['requests']} ({m['failed']})",
                 f"{m['request_throughput']:.2f}", f"{m['token_throughput']:.1f}{busy}", *latency_cells(m)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        result = run_remote(args)
    except RemoteError as exc:
        print(f"prefix-serve bench: {exc}", file=sys.stderr)
        return 2
    markdown = render_remote(result)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "remote.json").write_text(json.dumps(result, indent=2))
        (out / "remote.md").write_text(markdown + "\n")
    failed = sum(row["load"]["failed"] for row in result["sweep"])
    if failed:
        print(f"prefix-serve bench: {failed} requests failed", file=sys.stderr)
        return 1
    return 0
