"""`make bench-peers` (``python -m server.bench.peers``): prefix-serve against vLLM on the same weights.

One run: the embedded model exported once as a safetensors folder, then for each dtype prefix-serve and vLLM
started one after the other on that folder (same key/value memory, same engine threads), and the same
workloads sent to each over the OpenAI streaming API (``/v1/completions``, prompts as token ids so both
compute exactly the same tokens, ``ignore_eos`` so both generate exactly the budget):

1. one stream of 128 tokens: decode tokens/s;
2. 32 streams of 128 tokens sent at once: output tokens/s, inter-token latency p50;
3. one 6,000-token prompt: time to first token;
4. 32 requests sharing a 600-token preamble, sent at once: TTFT p50 / p99, all done;
5. the length mix: a 6,000-token prompt, then 32 short requests 50 ms apart: the short ones' TTFT p50, how
   many streamed at once (peak), all done.

Prints one table of ratios (ours / vLLM's, and which direction is better) under the CPU's model and flags,
and writes ``server/bench/results/peers/<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from server.bench import peer_servers
from server.bench.kv import GAP_S, SHORTS, _ids
from server.bench.load import RequestResult, complete_openai, summarise

REPO_ROOT = peer_servers.REPO_ROOT
WORKLOADS = ("single", "streams", "long_prompt", "preamble", "length_mix")


@dataclass(frozen=True)
class Sizes:
    """The workloads' sizes; a model with a short context (the tests' tiny one) gets smaller prompts."""
    new_tokens: int = 128
    streams: int = 32
    long_prompt: int = 6000
    preamble: int = 600
    short_prompt: int = 24
    short_new_tokens: int = 32

    @classmethod
    def fitting(cls, max_positions: int, **overrides) -> Sizes:
        sizes = cls(**overrides)
        long_prompt = min(sizes.long_prompt, max_positions - sizes.short_new_tokens - 8)
        return cls(**{**asdict(sizes), "long_prompt": long_prompt,
                      "preamble": min(sizes.preamble, max_positions // 8)})


def _body(model: str, prompt: list[int], new_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0}


async def _send(url: str, bodies: list[tuple[float, dict]]) -> tuple[list[RequestResult], float]:
    """Send each body at its time (seconds from now); every result and the wall time until all are done."""
    limits = httpx.Limits(max_connections=len(bodies) + 8)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()

        async def at(delay: float, body: dict) -> RequestResult:
            await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
            return await complete_openai(client, url, body)

        results = await asyncio.gather(*(at(delay, body) for delay, body in bodies))
    return list(results), time.perf_counter() - start


def _check(results: list[RequestResult], new_tokens: list[int], workload: str) -> None:
    failed = [i for i, r in enumerate(results) if not r.ok or r.tokens != new_tokens[i]]
    if failed:
        got = [(results[i].ok, results[i].tokens, new_tokens[i]) for i in failed[:3]]
        raise RuntimeError(f"{workload}: {len(failed)} requests failed or came back short "
                           f"(ok, tokens, wanted): {got}")


def _ttft(r: RequestResult) -> float:
    assert r.first_token is not None, "a checked request streamed its tokens"
    return r.first_token - r.start


def _time_per_token(r: RequestResult) -> float:
    """A stream's mean gap between tokens after the first (the usage count is exact; chunks may merge)."""
    assert r.first_token is not None and r.token_times, "a checked request streamed its tokens"
    return (r.token_times[-1] - r.first_token) / max(1, r.tokens - 1)


def peak_streaming(results: list[RequestResult]) -> int:
    """The most requests streaming tokens at one moment (first token seen, last not yet): what a client sees
    of how many requests the server runs at once."""
    events = sorted([(r.first_token, 1) for r in results if r.first_token is not None]
                    + [(r.token_times[-1], -1) for r in results if r.token_times])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def single(url: str, model: str, sizes: Sizes) -> dict:
    results, wall = asyncio.run(_send(url, [(0.0, _body(model, _ids(1, 32), sizes.new_tokens))]))
    _check(results, [sizes.new_tokens], "single")
    return {"decode_tokens_per_s": 1 / _time_per_token(results[0]), "ttft_s": _ttft(results[0]),
            "wall_s": wall}


def streams(url: str, model: str, sizes: Sizes) -> dict:
    bodies = [(0.0, _body(model, _ids(10 + i, 32), sizes.new_tokens)) for i in range(sizes.streams)]
    results, wall = asyncio.run(_send(url, bodies))
    _check(results, [sizes.new_tokens] * sizes.streams, "streams")
    summary = summarise(results, wall, sizes.streams)
    return {"output_tokens_per_s": sum(r.tokens for r in results) / wall, "wall_s": wall,
            "itl_p50_s": statistics.median(_time_per_token(r) for r in results),
            "chunk_gap_p50_s": summary["itl_s"].get("p50"), "ttft_p50_s": summary["ttft_s"]["p50"],
            "decode_tokens_per_s": summary["decode_token_throughput"]}


def long_prompt(url: str, model: str, sizes: Sizes) -> dict:
    results, _ = asyncio.run(_send(url, [(0.0, _body(model, _ids(2, sizes.long_prompt), 2))]))
    _check(results, [2], "long_prompt")
    ttft = _ttft(results[0])
    return {"prompt_tokens": sizes.long_prompt, "ttft_s": ttft,
            "prefill_tokens_per_s": sizes.long_prompt / ttft}


def preamble(url: str, model: str, sizes: Sizes) -> dict:
    shared = _ids(99, sizes.preamble)
    bodies = [(0.0, _body(model, shared + _ids(1000 + i, 12), 16)) for i in range(sizes.streams)]
    results, wall = asyncio.run(_send(url, bodies))
    _check(results, [16] * sizes.streams, "preamble")
    ttft = sorted(_ttft(r) for r in results)
    return {"preamble_tokens": sizes.preamble, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))], "wall_s": wall}


def length_mix(url: str, model: str, sizes: Sizes, first_arrival: float = 0.2) -> dict:
    new = sizes.short_new_tokens
    bodies = [(0.0, _body(model, _ids(0, sizes.long_prompt), new))]
    bodies += [(first_arrival + i * GAP_S, _body(model, _ids(i + 1, sizes.short_prompt), new))
               for i in range(SHORTS)]
    results, wall = asyncio.run(_send(url, bodies))
    _check(results, [sizes.short_new_tokens] * len(bodies), "length_mix")
    long, shorts = results[0], results[1:]
    return {"short_ttft_p50_s": statistics.median(_ttft(r) for r in shorts), "long_ttft_s": _ttft(long),
            "peak_streaming": peak_streaming(results), "requests": len(results), "wall_s": wall}


RUNNERS: dict[str, Callable[[str, str, Sizes], dict]] = {
    "single": single, "streams": streams, "long_prompt": long_prompt, "preamble": preamble,
    "length_mix": length_mix}


def served_model_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def run_workloads(url: str, sizes: Sizes, workloads: tuple[str, ...], label: str = "") -> dict:
    """Every workload of ``workloads`` against the OpenAI server at ``url``, after one short warm-up request
    (first-request costs are start-up, not serving)."""
    model = served_model_id(url)
    asyncio.run(_send(url, [(0.0, _body(model, _ids(3, 16), 4))]))
    out = {}
    for name in workloads:
        started = time.monotonic()
        out[name] = RUNNERS[name](url, model, sizes)
        elapsed = time.monotonic() - started
        print(f"peers: {label} {name} ({elapsed:.0f} s): {json.dumps(out[name])}", flush=True)
    return out


# (label, workload, figure, better: "higher" or "lower", unit scale, unit)
ROWS = [
    ("1 stream x {new}: decode tok/s", "single", "decode_tokens_per_s", "higher", 1, ""),
    ("{streams} streams x {new}: output tok/s", "streams", "output_tokens_per_s", "higher", 1, ""),
    ("{streams} streams: inter-token latency p50", "streams", "itl_p50_s", "lower", 1e3, " ms"),
    ("{long}-token prompt: time to first token", "long_prompt", "ttft_s", "lower", 1, " s"),
    ("{streams} requests sharing a {preamble}-token preamble: TTFT p50", "preamble", "ttft_p50_s", "lower", 1,
     " s"),
    ("{streams} requests sharing a {preamble}-token preamble: TTFT p99", "preamble", "ttft_p99_s", "lower", 1,
     " s"),
    ("{streams} requests sharing a {preamble}-token preamble: all done", "preamble", "wall_s", "lower", 1,
     " s"),
    ("length mix: short requests' TTFT p50", "length_mix", "short_ttft_p50_s", "lower", 1, " s"),
    ("length mix: peak streaming at once (of 33)", "length_mix", "peak_streaming", "higher", 1, ""),
    ("length mix: all done", "length_mix", "wall_s", "lower", 1, " s"),
    ("server start (until ready)", "start", "seconds", "lower", 1, " s"),
]


def _figure(side: dict, workload: str, key: str) -> float | None:
    if workload == "start":
        return side.get("start_s")
    return side.get("workloads", {}).get(workload, {}).get(key)


def _show(value: float | None, scale: float, unit: str) -> str:
    return "-" if value is None else f"{value * scale:.3g}{unit}"


def render(result: dict) -> str:
    sizes = result["sizes"]
    cpu = result["cpu"]
    fmt = {"new": sizes["new_tokens"], "streams": sizes["streams"], "long": f"{sizes['long_prompt']:,}",
           "preamble": sizes["preamble"]}
    flags = " ".join(cpu["relevant_flags"]) or "-"
    lines = [(f"**prefix-serve vs vLLM {result.get('vllm_version') or '(not run)'}** on {result['model']}, "
              f"{result['device']}, {result['threads']} engine thread(s) each, "
              f"{peer_servers.KV_CACHE_GIB} GiB of key/value memory each, servers one after the other; "
              f"{result['date']}"),
             "", f"CPU: {cpu['model']} ({cpu['cores']} cores); flags: {flags}", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    head = ["measurement"]
    for dtype in result["dtypes"]:
        head += [f"ours {dtype}", f"vLLM {dtype}", f"ours / vLLM {dtype}"]
    lines += ["| " + " | ".join(head + ["better"]) + " |", "|" + "---|" * (len(head) + 1)]
    for label, workload, key, better, scale, unit in ROWS:
        cells = [label.format(**fmt)]
        for dtype in result["dtypes"]:
            run = result["runs"][dtype]
            ours, peer = (_figure(run.get(side, {}), workload, key) for side in ("ours", "vllm"))
            ratio = f"{ours / peer:.2f}" if ours is not None and peer else "-"
            cells += [_show(ours, scale, unit), _show(peer, scale, unit), ratio]
        cells.append("> 1" if better == "higher" else "< 1")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default",
                        help="what both servers serve: 'default' (the embedded model, exported once to "
                             "--export-dir) or a model folder (used as it is)")
    parser.add_argument("--export-dir", default="build/peers-model",
                        help="where the embedded model's safetensors folder is written (reused)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated; bfloat16 is skipped on a CPU without avx512_bf16/AMX")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated of {WORKLOADS}")
    parser.add_argument("--quick", action="store_true",
                        help="fp32 only, 1 and 32 streams of 32 tokens and a 2,000-token prompt")
    parser.add_argument("--threads", type=int, default=1, help="engine threads of each server")
    parser.add_argument("--device", default="cpu", help="prefix-serve's --device (vLLM picks its own)")
    parser.add_argument("--vllm-python", default=None,
                        help="a python that already imports vllm (no install)")
    parser.add_argument("--vllm-venv", default=".venv-vllm", help="where vLLM is installed when needed")
    parser.add_argument("--vllm-package", default=peer_servers.VLLM_PACKAGE,
                        help="what pip installs there: the CPU build by default; on a GPU machine the "
                             "regular build, e.g. vllm==0.11.0")
    parser.add_argument("--no-vllm", action="store_true", help="prefix-serve alone (no install, no ratios)")
    parser.add_argument("--note", default="",
                        help="a line for the report (e.g. what else ran on the machine)")
    parser.add_argument("--out", default="server/bench/results/peers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    cpu = peer_servers.cpu_info()
    dtypes = ["float32"] if args.quick else [d for d in args.dtypes.split(",") if d]
    skipped = [d for d in dtypes if d == "bfloat16" and not peer_servers.has_bf16(cpu, args.device)]
    dtypes = [d for d in dtypes if d not in skipped]
    workloads = tuple(w for w in args.workloads.split(",") if w)
    if unknown := set(workloads) - set(WORKLOADS):
        raise SystemExit(f"--workloads: unknown {sorted(unknown)}; choose from {WORKLOADS}")
    folder = Path(args.model) if args.model != "default" else peer_servers.export_model(
        "default", (REPO_ROOT / args.export_dir).resolve())
    config = json.loads((folder / "config.json").read_text())
    overrides = {"new_tokens": 32, "long_prompt": 2000} if args.quick else {}
    sizes = Sizes.fitting(config.get("max_position_embeddings", 8192), **overrides)
    python = None
    if not args.no_vllm:
        python = args.vllm_python or str(peer_servers.install_vllm(REPO_ROOT / args.vllm_venv,
                                                                   args.vllm_package))
    now = datetime.datetime.now(datetime.UTC)
    result: dict = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "model": folder.name, "model_dir": str(folder),
        "device": args.device, "threads": args.threads, "dtypes": dtypes, "skipped_dtypes": skipped,
        "workloads": list(workloads), "sizes": asdict(sizes), "cpu": cpu, "note": args.note,
        "vllm_version": peer_servers.vllm_version(python) if python else None,
        "vllm_package": None if args.vllm_python else args.vllm_package, "runs": {}}
    max_len = sizes.long_prompt + sizes.short_new_tokens + 64
    for dtype in dtypes:
        run: dict = {}
        result["runs"][dtype] = run
        ours = peer_servers.serving_ours(folder, dtype, args.threads, args.device, sizes.streams + 1)
        with ours as (url, started):
            run["ours"] = {"start_s": started,
                           "workloads": run_workloads(url, sizes, workloads, f"ours {dtype}")}
        if python:
            peer = peer_servers.serving_vllm(python, folder, dtype, args.threads, args.device, max_len)
            with peer as (url, started):
                run["vllm"] = {"start_s": started,
                               "workloads": run_workloads(url, sizes, workloads, f"vLLM {dtype}")}
    markdown = render(result)
    print(markdown)
    out = REPO_ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = now.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(f"peers: wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
