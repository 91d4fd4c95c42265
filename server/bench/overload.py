"""A server under load, measured from outside: decode speed while requests wait, with and without another
process taking a core, and a burst of twice what the server admits.

Decode speed is read from the server's own ``prefix_serve_batch_size`` histogram (its sum counts the tokens
decoded, its count the decode steps) over a window in which ``running`` requests decode and ``waiting`` more
wait behind them, all as plain (non-streaming) ``POST /generate`` clients, the kind whose waiting costs the
HTTP layer the most (each one is polled for a disconnect). Prefill steps are not in that histogram, so the
figure is the engine's decode rate as the clients' load leaves it.

Run alone against any server: ``python -m server.bench.overload --url http://127.0.0.1:8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

PROMPT = "Write a long story about a lighthouse keeper and the sea."
_SERIES = re.compile(r"^prefix_serve_batch_size_(sum|count) ([0-9.e+]+)$", re.MULTILINE)


def _decode_counters(url: str) -> tuple[float, float]:
    """(tokens decoded, decode steps) so far, from /metrics."""
    found = dict(_SERIES.findall(httpx.get(f"{url}/metrics", timeout=10).text))
    return float(found["sum"]), float(found["count"])


async def _health(client: httpx.AsyncClient, url: str) -> dict:
    response = await client.get(f"{url}/healthz", timeout=10)
    return response.json()


async def _wait_for(client: httpx.AsyncClient, url: str, running: int, waiting: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = await _health(client, url)
        if health["running"] == running and health["waiting"] == waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server never reached {running} running / {waiting} waiting: {health}")
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def cpu_hog(enabled: bool = True) -> Iterator[None]:
    """Another process spinning on one core for the duration (what a noisy neighbour does)."""
    if not enabled:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        hog.kill()
        hog.wait()


async def decode_with_waiting(
    url: str, running: int, waiting: int, window_s: float, new_tokens: int = 400
) -> dict:
    """Decode tokens/s and steps/s while ``running`` requests decode and ``waiting`` more wait."""
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "ignore_eos": True}
    limits = httpx.Limits(max_connections=running + waiting + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        calls = [
            asyncio.create_task(client.post(f"{url}/generate", json=body)) for _ in range(running + waiting)
        ]
        try:
            async with httpx.AsyncClient() as probe:
                await _wait_for(probe, url, running, waiting, timeout=120)
                await asyncio.sleep(1.0)  # past the joiners' prefill
                tokens0, steps0 = _decode_counters(url)
                t0 = time.monotonic()
                await asyncio.sleep(window_s)
                tokens1, steps1 = _decode_counters(url)
                # A starved engine may take longer than the window for one step: wait for it (up to a
                # minute), so the rate is of at least one step rather than a zero from a window too short.
                while steps1 == steps0 and time.monotonic() - t0 < max(window_s, 60.0):
                    await asyncio.sleep(0.1)
                    tokens1, steps1 = _decode_counters(url)
                elapsed = time.monotonic() - t0
                health = await _health(probe, url)
        finally:
            for call in calls:
                call.cancel()  # the connections close: the server cancels every request
            await asyncio.gather(*calls, return_exceptions=True)
    async with httpx.AsyncClient() as probe:
        await _wait_for(probe, url, 0, 0, timeout=120)
    if health["running"] != running:
        raise RuntimeError(f"a running request ended inside the window ({health}): raise new_tokens")
    return {
        "running": running,
        "waiting": waiting,
        "window_s": round(elapsed, 2),
        "decode_tokens_per_s": (tokens1 - tokens0) / elapsed,
        "steps_per_s": (steps1 - steps0) / elapsed,
    }


async def burst(url: str, count: int, new_tokens: int, client_timeout: float) -> dict:
    """``count`` requests at once. Goodput counts the tokens of requests answered within ``client_timeout``
    (what clients with that timeout received); latencies are those of accepted requests."""
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, int, bool]:
        start = time.monotonic()
        response = await client.post(f"{url}/generate", json=body)
        latency = time.monotonic() - start
        tokens = len(response.json().get("token_ids", [])) if response.status_code == 200 else 0
        return response.status_code, latency, tokens, "retry-after" in response.headers

    limits = httpx.Limits(max_connections=count + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.monotonic()
        results = await asyncio.gather(*(one(client) for _ in range(count)))
        wall = time.monotonic() - start
    accepted = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] in (429, 503)]
    latencies = sorted(r[1] for r in accepted)
    in_time = [r for r in accepted if r[1] <= client_timeout]
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None
    return {
        "requests": count,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "rejected_share": len(rejected) / count,
        "other_status": sorted({r[0] for r in results} - {200, 429, 503}),
        "rejections_with_retry_after": sum(r[3] for r in rejected),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": pct(0.99),
        "within_client_timeout": len(in_time),
        "client_timeout_s": client_timeout,
        "goodput_tokens_per_s": sum(r[2] for r in in_time) / wall,
        "wall_s": wall,
    }


def run(url: str, waiting: list[int], running: int, window_s: float, hog_too: bool = True) -> dict:
    """Decode at each queue depth, idle and (``hog_too``) with a CPU hog beside the server."""
    out: dict[str, list] = {"decode": []}
    for hog in [False, True] if hog_too else [False]:
        with cpu_hog(hog):
            for n in waiting:
                point = asyncio.run(decode_with_waiting(url, running, n, window_s))
                out["decode"].append({"cpu_hog": hog, **point})
    return out


def engine_configs(cores: int) -> list[tuple[str, tuple[str, ...]]]:
    """The engine-process settings the overload section compares: the server's default first, then every
    core with libgomp's own wait policy (spin, then sleep) and with passive waits (sleep at once)."""
    every = ("--threads", str(cores))
    return [("default", ("--threads", "0")), (f"{cores} threads", every + ("--omp-wait-policy", "default")),
            (f"{cores} threads, passive", every + ("--omp-wait-policy", "passive"))]


def run_served(model: str, args) -> dict:
    """``prefix-serve bench``'s overload section on servers it starts: decode at each queue depth (a queue
    limit large enough to hold the deepest), idle and beside a CPU hog, for each of :func:`engine_configs`;
    then a burst of twice what a server with the default settings admits."""
    from server.bench.serving import serving

    running = args.concurrency
    deepest = max(args.overload_waiting)
    out: dict = {"running": running, "waiting": args.overload_waiting, "window_s": args.overload_window,
                 "configs": []}
    for name, extra in engine_configs(len(os.sched_getaffinity(0))):
        extra_args = ("--max-waiting-requests", str(deepest), *extra)
        with serving(model, args, running, extra_args=extra_args) as url:
            threads = httpx.get(f"{url}/healthz", timeout=10).json().get("engine_threads")
            points = run(url, args.overload_waiting, running, args.overload_window)["decode"]
        out["configs"].append({"name": name, "args": list(extra), "engine_threads": threads,
                               "decode": points})
    with serving(model, args, running) as url:  # the default queue limit: 2 x the batch
        admitted = running + 2 * running
        out["burst"] = asyncio.run(burst(url, 2 * admitted, args.new_tokens, client_timeout=30.0))
    return out


def queue_ratio(points: list[dict]) -> float | None:
    """Decode with the deepest queue / with none, machine otherwise idle (the issue's target: >= 0.9)."""
    idle = {p["waiting"]: p["decode_tokens_per_s"] for p in points if not p["cpu_hog"]}
    if 0 not in idle or len(idle) < 2:
        return None
    return idle[max(idle)] / idle[0]


def hog_share(points: list[dict]) -> float | None:
    """Decode beside a CPU hog / idle, with nothing waiting."""
    at_zero = {p["cpu_hog"]: p["decode_tokens_per_s"] for p in points if p["waiting"] == 0}
    return at_zero[True] / at_zero[False] if len(at_zero) == 2 else None


def render(overload: dict) -> str:
    """The overload section of the benchmark report (markdown)."""
    configs = overload["configs"]
    head = " | ".join(f"{c['name']}, {kind}" for c in configs for kind in ("idle", "hog"))
    lines = [(f"\nDecode tokens/s with {overload['running']} requests running and N more waiting "
              "(plain /generate clients), idle and with a CPU hog on one core, per engine-process "
              "setting:"), "",
             f"| waiting | {head} |", "|---|" + "---|" * (2 * len(configs))]
    for n in overload["waiting"]:
        cells = []
        for c in configs:
            by = {(p["cpu_hog"], p["waiting"]): p["decode_tokens_per_s"] for p in c["decode"]}
            cells += [by.get((hog, n)) for hog in (False, True)]
        lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    shares = [(c["name"], hog_share(c["decode"])) for c in configs]
    lines.append("\nBeside the hog / idle: "
                 + ", ".join(f"{name} {v:.2f}" for name, v in shares if v is not None) + ".")
    b = overload.get("burst")
    if b:
        lines.append(
            f"\nBurst of {b['requests']} requests at once (twice what the default queue admits): "
            f"{b['accepted']} accepted, {b['rejected_share']:.0%} refused at once with 503 + Retry-After "
            f"({b['rejections_with_retry_after']} with the header); accepted latency p50 "
            f"{b['latency_p50_s']:.1f} s, p99 {b['latency_p99_s']:.1f} s; goodput within a "
            f"{b['client_timeout_s']:.0f} s client timeout "
            f"{b['goodput_tokens_per_s']:.1f} tok/s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--running", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument("--waiting", default="0,64,128,256")
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--no-hog", action="store_true")
    parser.add_argument("--burst", type=int, default=0, help="requests in the burst (0: none)")
    parser.add_argument("--burst-new-tokens", type=int, default=32)
    parser.add_argument("--client-timeout", type=float, default=30.0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    result = run(
        args.url, [int(x) for x in args.waiting.split(",") if x], args.running, args.window, not args.no_hog
    )
    if args.burst:
        result["burst"] = asyncio.run(burst(args.url, args.burst, args.burst_new_tokens, args.client_timeout))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
