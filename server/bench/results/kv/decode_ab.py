"""How ``decode_ab_2026-12-04.jsonl`` was made: decode tok/s of 32 short streams, in process, one checkout.

Run it once per checkout, alternating checkouts, so that machine drift hits each alike::

    PYTHONPATH=<checkout> python server/bench/results/kv/decode_ab.py <label>

Default model, float32, 2 torch threads; 32 prompts of 32 tokens, then 30 decode steps timed; four rounds,
the first dropped as warm-up; prints one JSON line. It uses only the engine API the dense slab (ce2dff1) had.
"""

import json
import statistics
import sys
import time

import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams, Sequence


def _ids(seed: int, length: int) -> list[int]:
    return [(7919 * seed + 31 * j) % 4000 + 100 for j in range(length)]


def main() -> None:
    torch.set_num_threads(2)
    base = load_base_model("default", torch.float32, "cpu")
    config = EngineConfig(max_batch_size=33, max_step_tokens=512)
    rates = []
    for r in range(4):
        engine = Engine(base, config)
        seqs = [Sequence(_ids(r * 64 + i, 32), SamplingParams(max_new_tokens=60, ignore_eos=True))
                for i in range(32)]
        for seq in seqs:
            engine.submit(seq)
        while engine.num_waiting or any(not seq.output_ids for seq in seqs):
            engine.step()
        start, tokens = time.perf_counter(), 0
        for _ in range(30):
            tokens += engine.step()
        rates.append(tokens / (time.perf_counter() - start))
        while engine.num_running or engine.num_waiting:
            engine.step()
    print(json.dumps({"label": sys.argv[1], "runs": rates[1:], "median": statistics.median(rates[1:])}))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
