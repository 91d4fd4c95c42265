"""Key/value memory workloads (issue #21), in process, one engine thread, wall-clock arrivals.

1. length mix: one 6,000-token prompt, then 32 short requests 50 ms apart: the short requests' time to first
   token, how many requests ran at once, the long prompt's own TTFT;
2. a shared 600-token preamble under 32 different questions, on 4 tasks and the base model: TTFT p50 cold
   (nothing cached) and warm (the same preamble again, new questions);
3. decode: 32 short requests, and the same 32 while a 6,000-token request decodes beside them (a short row
   should not pay for a long neighbour);
4. key/value bytes held per request against the tokens it holds.

It uses only the engine API every release since the engine process has (``Engine``, ``EngineConfig``,
``Sequence``), so the same file measures an older commit too: ``PYTHONPATH=<old checkout> python -m
server.bench.kv --out before.json`` (figures an older engine cannot give are ``null``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from server.bench.offline import random_tasks
from server.engine.engine import Engine, EngineConfig
from server.engine.model import BaseModel, load_base_model
from server.engine.sequence import SamplingParams, Sequence

LONG_PROMPT, SHORT_PROMPT, SHORTS, GAP_S = 6000, 24, 32, 0.05


def _ids(seed: int, length: int) -> list[int]:
    return [(7919 * seed + 31 * j) % 4000 + 100 for j in range(length)]


def _params(new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new, ignore_eos=True)


def _run(engine: Engine, arrivals: list[tuple[float, Sequence]]) -> dict:
    """Submit each sequence once its arrival time (seconds from now) has passed; step until all finish."""
    start = time.monotonic()
    pending = sorted(arrivals, key=lambda a: a[0])
    peak = 0
    while pending or engine.num_running or engine.num_waiting:
        now = time.monotonic() - start
        while pending and pending[0][0] <= now:
            seq = pending.pop(0)[1]
            seq.arrival_time = time.monotonic()  # its real arrival, for its time to first token
            engine.submit(seq)
        if not engine.num_running and not engine.num_waiting:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        engine.step()
        peak = max(peak, engine.num_running)
    return {"wall_s": time.monotonic() - start, "peak_running": peak}


def _ttft(seq: Sequence) -> float:
    assert seq.first_token_time is not None, "every request got a token"
    return seq.first_token_time - seq.arrival_time


def length_mix(base: BaseModel, config: EngineConfig, long_prompt: int = LONG_PROMPT,
               first_arrival: float = 0.2) -> dict:
    engine = Engine(base, config)
    long = Sequence(_ids(0, long_prompt), _params(32))
    shorts = [Sequence(_ids(i + 1, SHORT_PROMPT), _params(32)) for i in range(SHORTS)]
    arrivals = [(0.0, long)] + [(first_arrival + i * GAP_S, seq) for i, seq in enumerate(shorts)]
    run = _run(engine, arrivals)
    short_ttft = [_ttft(s) for s in shorts]
    assert long.first_token_time is not None, "the long request finished"
    before_long = sum(1 for s in shorts if s.first_token_time is not None and
                      s.first_token_time < long.first_token_time)
    return {**run, "requests": SHORTS + 1, "short_ttft_p50_s": statistics.median(short_ttft),
            "short_ttft_p99_s": sorted(short_ttft)[int(0.99 * (SHORTS - 1))],
            "long_ttft_s": _ttft(long), "shorts_first_token_before_long": before_long}


def shared_preamble(base: BaseModel, config: EngineConfig, virtual_tokens: int, length: int = 600) -> dict:
    engine = Engine(base, config)
    tasks = [None, *random_tasks(base, 4, virtual_tokens)]
    preamble = _ids(99, length)

    def wave(offset: int) -> list[Sequence]:
        seqs = [Sequence(preamble + _ids(offset + i, 12), _params(16), tasks[i % len(tasks)])
                for i in range(32)]
        _run(engine, [(0.0, seq) for seq in seqs])
        return seqs

    cold, warm = wave(1000), wave(2000)
    cached = [getattr(seq, "num_cached_tokens", None) for seq in warm]
    return {"cold_ttft_p50_s": statistics.median(_ttft(s) for s in cold),
            "warm_ttft_p50_s": statistics.median(_ttft(s) for s in warm),
            "warm_cached_tokens_mean": None if None in cached else statistics.mean(cached)}  # type: ignore


def _decode_tokens_per_s(engine: Engine, shorts: list[Sequence], steps: int = 30) -> float:
    for seq in shorts:
        engine.submit(seq)
    while engine.num_waiting or any(not seq.output_ids for seq in shorts):
        engine.step()
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += engine.step()
    elapsed = time.perf_counter() - start
    while engine.num_running or engine.num_waiting:
        engine.step()
    return tokens / elapsed


def decode(base: BaseModel, config: EngineConfig, rounds: int = 3, long_prompt: int = LONG_PROMPT) -> dict:
    alone, beside = [], []
    for r in range(rounds):
        engine = Engine(base, config)
        alone.append(_decode_tokens_per_s(engine, [Sequence(_ids(r * 64 + i, 32), _params(60))
                                                   for i in range(SHORTS)]))
        engine = Engine(base, config)
        long = Sequence(_ids(7, long_prompt), _params(400))
        engine.submit(long)
        while not long.output_ids:
            engine.step()
        shorts = [Sequence(_ids(r * 64 + i, 32), _params(60)) for i in range(SHORTS)]
        # tokens of the 32 short rows only, per second, while the long one decodes beside them
        beside.append(_decode_tokens_per_s(engine, shorts) * SHORTS / (SHORTS + 1))
        engine.cancel(long)
        engine.run_until_idle()
    return {"short_decode_tokens_per_s": statistics.median(alone),
            "short_decode_beside_long_tokens_per_s": statistics.median(beside)}


def kv_bytes_per_request(base: BaseModel, config: EngineConfig, virtual_tokens: int) -> dict:
    """32 requests of one task, 32-token prompts and 128-token budgets, after 16 generated tokens each."""
    engine = Engine(base, config)
    task = random_tasks(base, 1, virtual_tokens)[0]
    seqs = [Sequence(_ids(i, 32), _params(128), task) for i in range(SHORTS)]
    for seq in seqs:
        engine.submit(seq)
    while any(len(seq.output_ids) < 16 for seq in seqs):
        engine.step()
    per_token = base.shape.kv_width * base.dtype.itemsize
    held_tokens = sum(virtual_tokens + len(seq.prompt_ids) + len(seq.output_ids) for seq in seqs)
    blocks = getattr(engine, "blocks", None)
    if blocks is not None:  # the paged cache: blocks in use (the task's prefix once) x bytes per block
        used = blocks.num_blocks - blocks.pool.num_free
        held = used * blocks.block_size * per_token
    else:  # the dense slab: its whole allocation
        held = engine.runner.cache.nbytes  # type: ignore[attr-defined]
    engine.run_until_idle()
    return {"bytes_per_request": held / SHORTS, "tokens_per_request": held_tokens / SHORTS,
            "bytes_per_token_held": held / held_tokens, "bytes_per_token": per_token}


def run(base: BaseModel, max_step_tokens: int = 512, virtual_tokens: int = 16, long_prompt: int = LONG_PROMPT,
        preamble: int = 600, rounds: int = 3, first_arrival: float = 0.2) -> dict:
    """Every workload; ``long_prompt`` and ``preamble`` shrink for models with a short context (tests)."""
    config = EngineConfig(max_batch_size=SHORTS + 1, max_step_tokens=max_step_tokens)
    result: dict = {"long_prompt": long_prompt, "preamble": preamble}
    for name, phase in (("length_mix", lambda: length_mix(base, config, long_prompt, first_arrival)),
                        ("shared_preamble", lambda: shared_preamble(base, config, virtual_tokens, preamble)),
                        ("decode", lambda: decode(base, config, rounds, long_prompt)),
                        ("kv_bytes", lambda: kv_bytes_per_request(base, config, virtual_tokens))):
        started = time.monotonic()
        result[name] = phase()
        elapsed = time.monotonic() - started
        print(f"kv bench: {name} ({elapsed:.0f} s): {json.dumps(result[name])}", flush=True)
    return result


def render(before: dict | None, after: dict) -> str:
    rows = [
        ("length mix: short requests' TTFT p50 (s)", "length_mix", "short_ttft_p50_s"),
        ("length mix: peak running (of 33)", "length_mix", "peak_running"),
        ("length mix: short first tokens before the long one's", "length_mix",
         "shorts_first_token_before_long"),
        ("length mix: the long prompt's TTFT (s)", "length_mix", "long_ttft_s"),
        ("length mix: all done (s)", "length_mix", "wall_s"),
        ("shared preamble: TTFT p50 cold (s)", "shared_preamble", "cold_ttft_p50_s"),
        ("shared preamble: TTFT p50 warm (s)", "shared_preamble", "warm_ttft_p50_s"),
        ("shared preamble: warm requests' cached tokens (mean)", "shared_preamble",
         "warm_cached_tokens_mean"),
        ("decode, 32 short streams (tok/s)", "decode", "short_decode_tokens_per_s"),
        ("decode, the same 32 beside a 6,000-token one (tok/s)", "decode",
         "short_decode_beside_long_tokens_per_s"),
        ("KV bytes held per request (KiB)", "kv_bytes", "bytes_per_request"),
        ("KV bytes held per token held (x bytes per token)", "kv_bytes", "bytes_per_token_held"),
    ]

    def cell(result: dict | None, phase: str, key: str) -> str:
        value = None if result is None else result.get(phase, {}).get(key)
        if value is None:
            return "-"
        if key == "bytes_per_request":
            return f"{value / 1024:.0f}"
        if key == "bytes_per_token_held":
            return f"{value / result[phase]['bytes_per_token']:.2f}"  # type: ignore[index]
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| workload | before (dense) | after (paged) |", "|---|---|---|"]
    lines += [f"| {label} | {cell(before, p, k)} | {cell(after, p, k)} |" for label, p, k in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for this run's figures")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--before", help="an earlier run's JSON: print both side by side")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base_model("default", torch.float32, "cpu")
    result = run(base)
    Path(args.out).write_text(json.dumps(result, indent=2))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    print(render(before, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
