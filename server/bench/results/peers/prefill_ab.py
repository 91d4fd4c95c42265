"""How ``prefill_ab_2026-12-07.jsonl`` was made: prefill tokens/s of one long-lived engine, one checkout.

Run it once per checkout, alternating checkouts (issue #23: this stop's engine against 1bbeb55)::

    PYTHONPATH=<checkout> python server/bench/results/peers/prefill_ab.py <label>

Default model, bfloat16, one torch thread, one engine kept for the whole run as a server keeps it (a fresh
engine per measurement, as stack_ab.py makes, touches a fresh key/value pool each time and read 0.88-0.92x
for the 2,000-token prompt where this reads 1.04x); a warm-up 2,000-token prompt, then three more and one
of 6,000 tokens, each alone; one JSON line.
"""

import json
import sys
import time

import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams, Sequence


def _ids(seed: int, length: int) -> list[int]:
    return [(7919 * seed + 31 * j) % 4000 + 100 for j in range(length)]


def main() -> None:
    torch.set_num_threads(1)
    base = load_base_model("default", torch.bfloat16, "cpu")
    engine = Engine(base, EngineConfig(max_batch_size=33, max_step_tokens=512))

    def prefill(seed: int, length: int) -> float:
        seq = Sequence(_ids(seed, length), SamplingParams(max_new_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        engine.submit(seq)
        while not seq.output_ids:
            engine.step()
        return length / (time.perf_counter() - start)

    prefill(1, 2000)
    row = {"label": sys.argv[1], "p2000": [prefill(10 + i, 2000) for i in range(3)],
           "p6000": prefill(20, 6000), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
