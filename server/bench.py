"""`prefix-serve bench`: decode throughput ratios measured in one process, against baselines run alongside.

1. mixed / single: a batch of N requests on N different tasks vs the same batch on one task. The cost
   of serving many tasks at once; the target is >= 0.9.
2. batched / one-at-a-time: N concurrent requests vs the same N served one after another (what a
   server without batching does). The target is >= 4 on a 2-core CPU.

Rounds alternate the configurations so drift on a noisy machine hits both sides alike; medians are
reported. Tasks are random prefix-tuning tensors of the model's shape: cost depends only on shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prefixes.artifact import PrefixKind
from prefixes.store import ResidentPrefix, TaskRecord
from server.config import DTYPES
from server.engine.engine import Engine, EngineConfig
from server.engine.model import BaseModel, load_base_model
from server.engine.sequence import SamplingParams, Sequence

TARGETS = {"mixed_over_single": 0.9, "batched_over_serial": 4.0}


def random_tasks(base: BaseModel, count: int, num_virtual_tokens: int) -> list[ResidentPrefix]:
    s = base.shape
    g = torch.Generator().manual_seed(0)
    tasks = []
    for i in range(count):
        kv = torch.randn(s.num_layers, 2, s.num_kv_heads, num_virtual_tokens, s.head_dim, generator=g)
        record = TaskRecord(f"bench-{i}", PrefixKind.PREFIX_TUNING.value, num_virtual_tokens, "", 1,
                            kv.numel() * kv.element_size(), "bench", 0.0)
        tasks.append(ResidentPrefix(record, PrefixKind.PREFIX_TUNING, kv.to(base.device, base.dtype)))
    return tasks


def make_requests(tasks: list[ResidentPrefix], n: int, prompt_tokens: int, new_tokens: int) -> list[Sequence]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [Sequence([(7 * i + j) % 1000 + 10 for j in range(prompt_tokens)], params, tasks[i % len(tasks)])
            for i in range(n)]


def decode_tokens_per_s(engine: Engine, seqs: list[Sequence]) -> float:
    """Submit all, let the first step admit them, then time the decode steps that follow."""
    for seq in seqs:
        engine.submit(seq)
    engine.step()
    tokens, start = 0, time.perf_counter()
    while engine.num_running:
        tokens += engine.step()
    return tokens / (time.perf_counter() - start)


def end_to_end_tokens_per_s(engine: Engine, seqs: list[Sequence], concurrent: bool) -> float:
    start = time.perf_counter()
    if concurrent:
        for seq in seqs:
            engine.submit(seq)
        engine.run_until_idle()
    else:
        for seq in seqs:
            engine.submit(seq)
            engine.run_until_idle()
    return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)


def run(base: BaseModel, n: int, prompt_tokens: int, new_tokens: int, virtual_tokens: int, rounds: int = 3) -> dict:
    engine = Engine(base, EngineConfig(max_batch_size=max(n, 1)))
    tasks = random_tasks(base, n, virtual_tokens)
    # warm-up: first forwards allocate and tune kernels
    decode_tokens_per_s(engine, make_requests(tasks, n, prompt_tokens, 4))
    samples: dict[str, list[float]] = {"mixed": [], "single": [], "batched": [], "serial": []}
    for _ in range(rounds):
        samples["mixed"].append(decode_tokens_per_s(engine, make_requests(tasks, n, prompt_tokens, new_tokens)))
        samples["single"].append(decode_tokens_per_s(engine, make_requests(tasks[:1], n, prompt_tokens, new_tokens)))
        samples["batched"].append(end_to_end_tokens_per_s(
            engine, make_requests(tasks, n, prompt_tokens, new_tokens), concurrent=True))
        samples["serial"].append(end_to_end_tokens_per_s(
            engine, make_requests(tasks, n, prompt_tokens, new_tokens), concurrent=False))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": base.model_id, "device": str(base.device), "dtype": str(base.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "requests": n, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "virtual_tokens": virtual_tokens, "rounds": rounds,
        "tokens_per_s": med, "samples": samples,
        "ratios": {"mixed_over_single": med["mixed"] / med["single"],
                   "batched_over_serial": med["batched"] / med["serial"]},
    }


def report(result: dict) -> str:
    tps, ratios = result["tokens_per_s"], result["ratios"]
    lines = [
        f"model {result['model']} on {result['device']} ({result['dtype']}, {result['threads']} threads); "
        f"{result['requests']} requests x {result['new_tokens']} new tokens, prompt {result['prompt_tokens']}, "
        f"prefix {result['virtual_tokens']} virtual tokens; median of {result['rounds']} rounds",
        "",
        "| measurement | tokens/s |",
        "|---|---|",
        f"| decode, {result['requests']} requests on {result['requests']} different tasks | {tps['mixed']:.1f} |",
        f"| decode, {result['requests']} requests on one task | {tps['single']:.1f} |",
        f"| end to end, {result['requests']} concurrent requests | {tps['batched']:.1f} |",
        f"| end to end, the same requests one at a time | {tps['serial']:.1f} |",
        "",
        "| ratio | value | target | |",
        "|---|---|---|---|",
    ]
    for name, value in ratios.items():
        target = TARGETS[name]
        lines.append(f"| {name} | {value:.2f} | >= {target} | {'PASS' if value >= target else 'FAIL'} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    base = load_base_model(args.model, DTYPES[args.dtype], args.device)
    result = run(base, args.requests, args.prompt_tokens, args.new_tokens, args.virtual_tokens)
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
