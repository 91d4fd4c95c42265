"""`prefix-serve bench` (`make bench`): prefix-serve against the bare model and the alternatives, one run.

Prints a markdown table with every target marked PASS/FAIL and writes
``server/bench/results/latest.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from server.bench import kv, offline, overload, remote, sweep
from server.bench.load import LoadSpec, run_load
from server.bench.models import is_random, load_model, save_model
from server.bench.report import median, render_markdown, render_plot
from server.bench.serving import register_tasks, serving
from server.config import DTYPES
from server.engine.engine import EngineConfig
from server.frontend.local_client import LocalEngineClient

PREFILL_PROMPT = 6000  # tokens of the long prompt whose prefill is timed against the bare forward pass


def say(line: str) -> None:
    """One progress line, flushed at once: a full run takes most of an hour, its report comes at the end."""
    print(f"[bench] {line}", flush=True)


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@contextlib.contextmanager
def phase(name: str) -> Iterator[dict]:
    """``[bench] name ...`` now, and ``[bench] name: done in N s`` when the phase ends, followed by every
    figure the phase put into the yielded dict (floats to 4 significant digits)."""
    started = time.monotonic()
    say(f"{name} ...")
    figures: dict = {}
    yield figures
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    say(f"{name}: done in {time.monotonic() - started:.0f} s" + (f"; {shown}" if shown else ""))


def run_offline(base, args) -> dict:
    n, p, new = args.concurrency, args.prompt_tokens, args.new_tokens
    vt, rounds = args.virtual_tokens, args.rounds
    client = LocalEngineClient(base, EngineConfig(max_batch_size=n, max_step_tokens=args.max_step_tokens))
    tasks = offline.random_tasks(base, n, vt)
    offline.engine_decode_tokens_per_s(client, offline.make_requests(tasks, n, p, 4))  # warm-up
    ceiling, mixed, single, same_work, closed = [], [], [], [], []
    for _ in range(rounds):  # alternate, so drift hits every configuration alike
        ceiling.append(offline.bare_decode_tokens_per_s(base, n, p + vt, new))
        mixed.append(offline.engine_decode_tokens_per_s(client, offline.make_requests(tasks, n, p, new)))
        single.append(offline.engine_decode_tokens_per_s(client, offline.make_requests(tasks[:1], n, p, new)))
        same_work.append(offline.bare_same_work_tokens_per_s(base, n, vt, p, new))
        closed.append(offline.engine_closed_loop_tokens_per_s(client, tasks, n, 2 * n, p, new))
        say(f"offline round {len(ceiling)}/{rounds} (tok/s): bare forward {ceiling[-1]:.1f}, engine on "
            f"{n} tasks {mixed[-1]:.1f}, on one task {single[-1]:.1f}, bare same work {same_work[-1]:.1f}, "
            f"closed loop {closed[-1]:.1f}")
    # what a user would otherwise run, each against the engine serving the same requests at once
    half = max(2, n // 2)
    static_tasks = offline.random_tasks(base, half, vt)
    static_groups = [2] * half
    generate_serial = offline.generate_tokens_per_s(base, [1] * args.serial_requests, p + vt, new)
    say(f"transformers generate, one request at a time: {generate_serial:.1f} tok/s")
    generate_static = offline.generate_tokens_per_s(base, static_groups, p + vt, new)
    say(f"transformers generate, per-task static batches of 2: {generate_static:.1f} tok/s")
    engine_same_load = offline.engine_end_to_end_tokens_per_s(
        client, offline.make_requests(static_tasks, 2 * half, p, new), concurrent=True)
    say(f"engine on the same {2 * half} requests at once: {engine_same_load:.1f} tok/s")
    say(f"a {min(PREFILL_PROMPT, base.shape.max_positions // 2)}-token prefill, engine and bare ...")
    prefill = offline.prefill_against_bare(base, client, min(PREFILL_PROMPT, base.shape.max_positions // 2),
                                           max(2, rounds // 2))
    say(f"cold and hot prefix loads, then 1 to {max(args.scale_tasks)} registered tasks ...")
    model_bytes = sum(t.numel() * t.element_size() for t in base.model.parameters())  # tied weights once
    return {
        "ceiling_decode_tokens_per_s": median(ceiling),
        "engine_decode_mixed_tokens_per_s": median(mixed),
        "engine_decode_single_tokens_per_s": median(single),
        "bare_same_work_tokens_per_s": median(same_work),
        "engine_closed_loop_tokens_per_s": median(closed),
        "generate_one_at_a_time_tokens_per_s": generate_serial,
        "generate_static_per_task_tokens_per_s": generate_static,
        "engine_end_to_end_tokens_per_s": engine_same_load,
        "load_ms": offline.cold_and_hot_load_ms(base, vt),
        "prefill": prefill,
        "scale": offline.scale(base, args.scale_tasks, n, p, new, vt),
        "bytes_per_task": base.shape.kv_width * vt * 4,
        "model_bytes": model_bytes,
        "samples": {"ceiling": ceiling, "mixed": mixed, "single": single, "same_work": same_work,
                    "closed_loop": closed},
    }


def http_decode_rounds(base, url: str, names: list[str], args) -> dict:
    """The server's decode rate over HTTP against the bare forward pass, alternating in every round.

    Each round times the ceiling in this process (the server idles meanwhile), then sends
    ``concurrency`` streaming requests at once, each on its own task (and again all on one task), and
    takes the token rate over the window in which all of them are decoding. The ceiling is decode only,
    so this is the server's like-for-like figure; prefill is measured with the closed-loop sweep."""
    n, p, vt, new = args.concurrency, args.prompt_tokens, args.virtual_tokens, args.new_tokens
    burst = lambda tasks, mix: asyncio.run(run_load(url, LoadSpec(
        requests=n, concurrency=n, tasks=tuple(tasks), mix=mix, prompt_tokens=p, new_tokens=new)))
    ceiling, mixed, single = [], [], []
    for _ in range(args.rounds):
        ceiling.append(offline.bare_decode_tokens_per_s(base, n, p + vt, new))
        mixed.append(burst(names[:n], "distinct")["decode_token_throughput"])
        single.append(burst(names[:1], "distinct")["decode_token_throughput"])
    return {"ceiling": ceiling, "mixed": mixed, "single": single}


def run_http(base, model: str, args) -> dict:
    """Start a real server process for ``model``, register tasks, time its decode against the ceiling, and
    sweep concurrency with mixed and single-task load."""
    with serving(model, args, max(*args.sweep, args.concurrency)) as url:
        health = httpx.get(f"{url}/healthz").json()
        names = register_tasks(url, base.shape, max(*args.sweep, args.concurrency), args.virtual_tokens)
        common = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
        asyncio.run(run_load(url, LoadSpec(requests=4, concurrency=4, tasks=tuple(names), **common)))  # warm
        decode = http_decode_rounds(base, url, names, args)
        rows = []
        say("HTTP decode against the bare forward (tok/s): " + ", ".join(
            f"round {i + 1}: {rate(c)} / {rate(m)} on {args.concurrency} tasks / {rate(s)} on one"
            for i, (c, m, s) in enumerate(zip(decode["ceiling"], decode["mixed"], decode["single"]))))
        for c in args.sweep:
            requests = max(4 * c, 8)  # long enough for a window with every client busy
            mixed = asyncio.run(run_load(url, LoadSpec(requests=requests, concurrency=c, tasks=tuple(names),
                                                       mix="zipf", **common)))
            single = asyncio.run(run_load(url, LoadSpec(requests=requests, concurrency=c, tasks=(names[0],),
                                                        **common)))
            rows.append({"concurrency": c, "mixed": mixed, "single": single})
            say(f"HTTP concurrency {c}: {rate(mixed['token_throughput'])} tok/s on a Zipf mix, "
                f"{rate(single['token_throughput'])} on one task")
        poisson = asyncio.run(run_load(url, LoadSpec(requests=2 * max(args.sweep), rate=args.rate,
                                                     tasks=tuple(names), mix="zipf", **common)))
        return {"server": health.get("model"), "decode": decode, "sweep": rows,
                "poisson": {"rate": args.rate, **poisson}}


@contextlib.contextmanager
def served_model(base, args) -> Iterator:
    """``model()``: what `serve --model` takes for the benchmarked model. A random model is written to a
    temporary folder the first time it is asked for (only when a server is started), and removed after."""
    with tempfile.TemporaryDirectory(prefix="prefix-serve-bench-") as tmp:
        folder = Path(tmp) / re.sub(r"[^A-Za-z0-9._-]", "-", args.model)

        def model() -> str:
            if not is_random(args.model):
                return args.model
            if not folder.exists():
                save_model(base, folder)
            return str(folder)

        yield model


def result_name(args) -> str:
    """``llama-1b-cuda-bfloat16``: one figures file per model, device and dtype in a sweep's folder."""
    model = (args.model.removeprefix("random:") if is_random(args.model)
             else Path(args.model).name or args.model)
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{model}-{args.device}-{args.dtype}")


def write_sweep(result: dict, stem: Path) -> None:
    """``stem.json`` and ``stem.md`` (the name may hold dots, as in a model folder's name)."""
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(result, indent=2))
    stem.parent.joinpath(stem.name + ".md").write_text(sweep.render_sweep(result) + "\n")


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    # A time limit's SIGTERM (server/bench/gpu-check.sh runs each phase under one) unwinds like an error, so
    # the server process this run started is stopped too, instead of holding the device for the next phase.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.url:
        return remote.main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    say(f"loading {args.model} ({args.dtype} on {args.device})")
    base = load_model(args.model, DTYPES[args.dtype], args.device)
    result = {
        "model": base.model_id, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "virtual_tokens": args.virtual_tokens, "rounds": args.rounds, "max_step_tokens": args.max_step_tokens,
    }
    out = Path(args.out or ("server/bench/results/gpu" if args.batch_sizes else "server/bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    with served_model(base, args) as model:
        if args.batch_sizes:
            name = result_name(args)
            result["sweep"] = sweep.run_sweep(base, args)
            write_sweep(result, out / name)  # kept if the HTTP part does not finish
            if not args.no_http:
                start_server = lambda batch, kv_bytes: serving(model(), args, batch, kv_bytes)
                result["sweep"]["http"] = sweep.run_sweep_http(base, args, start_server)
                write_sweep(result, out / name)
            print(sweep.render_sweep(result))
            return 0
        result["concurrency"] = args.concurrency
        with phase(f"1/4 in process: bare forward, engine, generate ({args.rounds} rounds)") as shown:
            result["offline"] = run_offline(base, args)
            shown.update({k.removesuffix("_tokens_per_s") + " tok/s": v for k, v in result["offline"].items()
                          if k.endswith("_tokens_per_s")})
        if not args.no_kv:
            with phase("2/4 key/value memory: length mix, shared preamble, long neighbour"):
                long_prompt = min(kv.LONG_PROMPT, base.shape.max_positions // 2)
                result["kv"] = kv.run(base, args.max_step_tokens, args.virtual_tokens, long_prompt,
                                      min(600, base.shape.max_positions // 8))
        if not args.no_http:
            with phase(f"3/4 a real server over HTTP, concurrency {','.join(map(str, args.sweep))}"):
                result["http"] = run_http(base, model(), args)
        if not args.no_overload:
            with phase("4/4 overload: decode while requests wait, beside a CPU hog, a burst"):
                result["overload"] = overload.run_served(model(), args)
    markdown = render_markdown(result)
    if "kv" in result:
        markdown += "\n\n## Key/value memory (paged cache)\n\n" + kv.render(None, result["kv"])
    print(markdown)
    (out / "latest.json").write_text(json.dumps(result, indent=2))
    (out / "latest.md").write_text(markdown + "\n")
    if "http" in result:
        render_plot(result, out / "latest.png")
    return 0
