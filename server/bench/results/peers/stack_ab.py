"""How ``stack_ab_<date>.jsonl`` was made: the engine's decode and prefill speed, in process, one checkout.

Run it once per checkout, alternating checkouts, so that machine drift hits each alike (issue #23's lean
Llama stack and fused projections against the commit before them)::

    PYTHONPATH=<checkout> python server/bench/results/peers/stack_ab.py <label> <dtype>

Default model (SmolLM2-135M), one torch thread (as the served engine runs); decode tokens/s at 1 stream and
at 32 streams (prompts of 32 tokens, 40 steps timed after all are prefilled) and 2,000- and 6,000-token
prompts' prefill tokens/s, each alone; one JSON line (``stack_ab_2026-12-07.jsonl`` predates the 6,000).
It uses only the engine API both checkouts have.
"""

import json
import os
import sys
import time

import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams, Sequence


def _ids(seed: int, length: int) -> list[int]:
    return [(7919 * seed + 31 * j) % 4000 + 100 for j in range(length)]


def decode(base, streams: int, seed: int) -> float:
    engine = Engine(base, EngineConfig(max_batch_size=33, max_step_tokens=512))
    seqs = [Sequence(_ids(seed + i, 32), SamplingParams(max_new_tokens=50, ignore_eos=True))
            for i in range(streams)]
    for seq in seqs:
        engine.submit(seq)
    while engine.num_waiting or any(not seq.output_ids for seq in seqs):
        engine.step()
    start, tokens = time.perf_counter(), 0
    for _ in range(40):
        engine.step()
        tokens += streams
    return tokens / (time.perf_counter() - start)


def engine_for(base) -> Engine:
    return Engine(base, EngineConfig(max_batch_size=33, max_step_tokens=512))


def prefill(engine: Engine, length: int, seed: int) -> float:
    """One prompt alone to its first token on ``engine`` (main gives each measurement a fresh one)."""
    seq = Sequence(_ids(seed, length), SamplingParams(max_new_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    engine.submit(seq)
    while not seq.output_ids:
        engine.step()
    return length / (time.perf_counter() - start)


def main() -> None:
    label, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    torch.set_num_threads(1)
    base = load_base_model("default", dtype, "cpu")
    decode(base, 32, 900)  # warm-up
    row = {"label": label, "dtype": sys.argv[2], "threads": 1,
           "decode_1": decode(base, 1, 1), "decode_32": decode(base, 32, 100),
           "prefill_2000": prefill(engine_for(base), 2000, 7),
           "prefill_6000": prefill(engine_for(base), 6000, 8),
           "load1": os.getloadavg()[0],
           "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
