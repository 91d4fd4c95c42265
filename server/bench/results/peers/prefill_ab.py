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

# run as a script, this folder is on sys.path: the one-prompt measurement is stack_ab's, on one engine here
from stack_ab import engine_for, prefill  # type: ignore[import-not-found]

from server.engine.model import load_base_model


def main() -> None:
    torch.set_num_threads(1)
    base = load_base_model("default", torch.bfloat16, "cpu")
    engine = engine_for(base)
    prefill(engine, 2000, 1)
    row = {"label": sys.argv[1], "p2000": [prefill(engine, 2000, 10 + i) for i in range(3)],
           "p6000": prefill(engine, 6000, 20), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
