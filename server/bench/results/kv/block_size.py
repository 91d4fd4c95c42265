"""Decode tok/s of 32 short streams with blocks of 16, 64 and 128 token slots, on the current pool.

The three block sizes alternate round by round in one process, so machine drift hits each alike; the
figure to read is each size's ratio to 16 (medians of the rounds after the first, a warm-up)::

    PYTHONPATH=. python server/bench/results/kv/block_size.py [rounds] [threads] > block_size_<date>.json

Arguments: rounds (4) and torch threads (2). Default model, float32; 32 prompts of 32 tokens, then 30 decode
steps timed per round.
"""

import json
import platform
import statistics
import sys
import time

import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams, Sequence

SIZES = (16, 64, 128)


def _ids(seed: int, length: int) -> list[int]:
    return [(7919 * seed + 31 * j) % 4000 + 100 for j in range(length)]


def _cpu() -> str:
    from pathlib import Path

    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.machine()


def _rate(base, block_size: int, seed: int) -> float:
    engine = Engine(base, EngineConfig(max_batch_size=33, max_step_tokens=512, block_size=block_size))
    seqs = [Sequence(_ids(seed * 64 + i, 32), SamplingParams(max_new_tokens=60, ignore_eos=True))
            for i in range(32)]
    for seq in seqs:
        engine.submit(seq)
    while engine.num_waiting or any(not seq.output_ids for seq in seqs):
        engine.step()
    start, tokens = time.perf_counter(), 0
    for _ in range(30):
        tokens += engine.step()
    rate = tokens / (time.perf_counter() - start)
    engine.run_until_idle()
    return rate


def main(rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    base = load_base_model("default", torch.float32, "cpu")
    rates: dict[int, list[float]] = {size: [] for size in SIZES}
    for r in range(rounds + 1):
        for size in SIZES if r % 2 else reversed(SIZES):
            rates[size].append(_rate(base, size, r))
    medians = {size: statistics.median(runs[1:]) for size, runs in rates.items()}
    print(json.dumps({"cpu": _cpu(), "rounds": rates,
                      "median_tok_s": medians,
                      "ratio_to_16": {size: medians[size] / medians[16] for size in SIZES}}, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 4, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
