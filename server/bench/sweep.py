"""`prefix-serve bench --batch-sizes 1,32,128,256`: the engine and the server against the bare forward pass at
each batch size, and how long the device waits for the host in every engine step.

Made for a GPU (`server/bench/gpu-check.sh`), runs on any device. At each batch size ``b``, alternating over
rounds: the bare model's decode (the ceiling), the engine decoding ``b`` requests on ``b`` different tasks,
and on one task. Then one more engine run with every decode step timed on the device's own clock (CUDA
events):

- ``step_ms``: the step as the engine thread sees it, from picking requests to the sampled tokens on the host;
- ``device_forward_ms``: the device's time from the forward's first kernel to its last;
- ``host_forward_ms``: the host's time to queue that forward (as long as the device time: launches pace it);
- ``device_idle_share``: ``1 - device_forward / step``, the share of the step in which the device has no
  forward to run: scheduling, building the step's layout, sampling and copying the tokens to the host.

A large idle share is the case for capturing the decode step in a CUDA graph; a small one says the step is
the model's own time. Then a real server process (same weights) gets ``b`` streaming requests at once, on
``b`` tasks and on one task, and its decode rate over HTTP is read in the window in which all ``b`` decode.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import torch

from server.bench import offline
from server.bench.clock import DeviceClock
from server.bench.load import LoadSpec, run_load
from server.bench.report import median
from server.bench.serving import register_tasks
from server.engine.engine import EngineConfig
from server.engine.model import BaseModel
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState


def kv_cache_bytes(base: BaseModel, batch: int, tokens_per_request: int) -> int:
    """A key/value budget that admits ``batch`` requests of ``tokens_per_request`` positions at once."""
    need = batch * tokens_per_request * base.shape.kv_width * base.dtype.itemsize
    return max(EngineConfig().kv_cache_bytes, need)


def engine_for(base: BaseModel, batch: int, args) -> LocalEngineClient:
    tokens = args.prompt_tokens + args.virtual_tokens + args.new_tokens
    config = EngineConfig(max_batch_size=batch, max_step_tokens=max(args.max_step_tokens, batch),
                          kv_cache_bytes=kv_cache_bytes(base, batch, tokens))
    return LocalEngineClient(base, config)


def engine_step_timing(client: LocalEngineClient, states: list[RequestState]) -> dict[str, float]:
    """Prefill ``states``, then time every decode step: wall time on the host and, through a wrapper around
    the runner's forward, the device's time inside the forward and the host's time to queue it."""
    engine = client.engine
    clock = DeviceClock(engine.base.device)
    for state in states:
        offline.submit(client, state)
    while engine.num_waiting or engine.num_decoding < engine.num_running:
        client.step()
    runner = engine.runner
    original = runner.forward
    # (device mark before, device mark after, host seconds)
    forwards: list[tuple[torch.cuda.Event | float, torch.cuda.Event | float, float]] = []

    def timed_forward(*args):
        queued, begin = time.perf_counter(), clock.mark()
        out = original(*args)
        forwards.append((begin, clock.mark(), time.perf_counter() - queued))
        return out

    # the instance attribute shadows the class's forward for this run only (the stack's or the model's)
    runner.forward = timed_forward  # type: ignore[method-assign]
    walls, tokens = [], 0
    try:
        clock.synchronize()
        while engine.num_running:
            start = time.perf_counter()
            tokens += client.step()  # returns after the sampled tokens reached the host
            walls.append(time.perf_counter() - start)
    finally:
        del runner.forward
    clock.synchronize()
    device = sum(clock.seconds(a, b) for a, b, _ in forwards)
    host = sum(h for _, _, h in forwards)
    wall = sum(walls)
    return {"steps": len(walls), "tokens_per_s": tokens / wall, "step_ms": 1e3 * wall / len(walls),
            "device_forward_ms": 1e3 * device / len(walls), "host_forward_ms": 1e3 * host / len(walls),
            "device_idle_share": max(0.0, 1 - device / wall)}


def run_batch(base: BaseModel, tasks: list, batch: int, args) -> dict:
    """Ceiling, engine on ``batch`` tasks and on one, alternating; then the timed decode steps."""
    p, vt, new = args.prompt_tokens, args.virtual_tokens, args.new_tokens
    client = engine_for(base, batch, args)
    offline.engine_decode_tokens_per_s(client, offline.make_requests(tasks[:batch], batch, p, 4))  # warm-up
    offline.bare_decode_timing(base, batch, p + vt, 4)
    ceiling, mixed, single = [], [], []
    for _ in range(args.rounds):
        ceiling.append(offline.bare_decode_timing(base, batch, p + vt, new))
        mixed.append(offline.engine_decode_tokens_per_s(
            client, offline.make_requests(tasks[:batch], batch, p, new)))
        single.append(offline.engine_decode_tokens_per_s(
            client, offline.make_requests(tasks[:1], batch, p, new)))
    steps = engine_step_timing(client, offline.make_requests(tasks[:batch], batch, p, new))
    del client
    if base.device.type == "cuda":
        torch.cuda.empty_cache()  # the next batch size sizes its own cache
    return {"batch": batch, "ceiling": ceiling, "mixed": mixed, "single": single, "steps": steps}


def http_batches(url: str, names: list[str], batch_sizes: list[int], args) -> list[dict]:
    """At each batch size, bursts of ``b`` streaming requests on ``b`` tasks and on one, alternating."""
    common = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    asyncio.run(run_load(url, LoadSpec(requests=4, concurrency=4, tasks=tuple(names), **common)))  # warm-up

    def burst(b: int, tasks: list[str]) -> dict:
        return asyncio.run(run_load(url, LoadSpec(
            requests=b, concurrency=b, tasks=tuple(tasks), mix="distinct", **common)))

    rows = []
    for b in batch_sizes:
        mixed, single = [], []
        for _ in range(args.rounds):
            mixed.append(burst(b, names[:b]))
            single.append(burst(b, names[:1]))
        rows.append({"batch": b, "mixed": mixed, "single": single})
    return rows


def run_sweep(base: BaseModel, args) -> dict:
    """Every batch size of ``--batch-sizes``, in process."""
    sizes = sorted(args.batch_sizes)
    tasks = offline.random_tasks(base, max(sizes), args.virtual_tokens)
    return {"batches": [run_batch(base, tasks, b, args) for b in sizes]}


def run_sweep_http(base: BaseModel, args, serving) -> dict:
    """Every batch size over HTTP, against a real server process that
    ``serving(max_batch_size, kv_cache_bytes)`` starts, yielding its URL."""
    sizes = sorted(args.batch_sizes)
    tokens = args.prompt_tokens + args.virtual_tokens + args.new_tokens
    with serving(max(sizes), kv_cache_bytes(base, max(sizes), tokens)) as url:
        names = register_tasks(url, base.shape, max(sizes), args.virtual_tokens)
        return {"server": httpx.get(f"{url}/healthz").json().get("model"),
                "batches": http_batches(url, names, sizes, args)}


# -- the report ------------------------------------------------------------------------------------------


def _http_row(http: dict | None, batch: int) -> dict | None:
    if http is None:
        return None
    return next((row for row in http["batches"] if row["batch"] == batch), None)


def _decode(loads: list[dict]) -> float | None:
    rates = [m["decode_token_throughput"] for m in loads]
    return median(rates) if rates and all(rates) else None


def _pct(loads: list[dict], key: str, q: str) -> float | None:
    values = [m[key][q] for m in loads if m[key].get(q) is not None]
    return median(values) if values else None


def render_sweep(result: dict) -> str:
    sweep = result["sweep"]
    http = sweep.get("http")
    lines = [
        (f"**{result['model']}** on {result['device']} ({result['dtype']}); prompt "
         f"{result['prompt_tokens']} tokens, prefix {result['virtual_tokens']} virtual tokens, "
         f"{result['new_tokens']} new tokens; at most {result['max_step_tokens']} tokens per engine step "
         f"(at least the batch); medians of {result['rounds']} alternating rounds; decode tokens/s"),
        "",
        ("| batch | bare forward | engine, N tasks | engine, one task | N tasks / one | engine / bare "
         "| server over HTTP, N tasks / one task | HTTP / bare | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sweep["batches"]:
        ceiling = median([c["tokens_per_s"] for c in row["ceiling"]])
        mixed, single = median(row["mixed"]), median(row["single"])
        cells = [str(row["batch"]), f"{ceiling:.1f}", f"{mixed:.1f}", f"{single:.1f}",
                 f"{mixed / single:.2f}", f"{mixed / ceiling:.2f}"]
        loads = _http_row(http, row["batch"])
        if loads is None:
            cells += ["not run"] * 4
        else:
            over_http, one = _decode(loads["mixed"]), _decode(loads["single"])
            rate = lambda v: "no window" if v is None else f"{v:.1f}"
            fmt = lambda v, scale, digits: "-" if v is None else f"{scale * v:.{digits}f}"
            ttft = [fmt(_pct(loads["mixed"], "ttft_s", q), 1, 2) for q in ("p50", "p99")]
            itl = [fmt(_pct(loads["mixed"], "itl_s", q), 1e3, 1) for q in ("p50", "p99")]
            cells += [f"{rate(over_http)} / {rate(one)}",
                      "-" if over_http is None else f"{over_http / ceiling:.2f}",
                      " / ".join(ttft), " / ".join(itl)]
        lines.append("| " + " | ".join(cells) + " |")
    clock = ("CUDA events" if result["device"].startswith("cuda")
             else "the host clock: on a CPU the device is the host")
    lines += [
        "",
        f"Host overhead per decode step (engine, N tasks; device times from {clock}):",
        "",
        ("| batch | engine step (ms) | device in forward (ms) | host queuing the forward (ms) "
         "| device idle, share of step | bare loop: step (ms) / device share |"),
        "|---|---|---|---|---|---|",
    ]
    for row in sweep["batches"]:
        s = row["steps"]
        bare = row["ceiling"][len(row["ceiling"]) // 2]
        lines.append(f"| {row['batch']} | {s['step_ms']:.2f} | {s['device_forward_ms']:.2f} "
                     f"| {s['host_forward_ms']:.2f} | {100 * s['device_idle_share']:.1f}% "
                     f"| {bare['step_ms']:.2f} / {100 * bare['device_share']:.1f}% |")
    shares = ", ".join(f"{100 * row['steps']['device_idle_share']:.0f}% at batch {row['batch']}"
                       for row in sweep["batches"])
    lines.append(f"\nDevice idle between the engine's forwards: {shares} (scheduling, the step's layout, "
                 "sampling, the tokens' copy to the host). A share that stays large at the batch sizes "
                 "served is the case for a CUDA graph of the decode step; a host queuing time close to the "
                 "device time means the forward itself is paced by kernel launches.")
    return "\n".join(lines)
