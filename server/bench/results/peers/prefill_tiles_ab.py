"""How ``prefill_tiles_ab_<date>.jsonl`` was made: prefill with the prefill attention kernel (bfloat16: AMX
tiles, cpu_prefill.c; float32: AVX-512 FMAs, cpu_prefill_f32.c) against torch's flash attention (the split
and causal calls of merged_attention.py), one engine, one process, the modes alternated within each round::

    cd server/bench/results/peers
    PYTHONPATH=<checkout> python prefill_tiles_ab.py <rounds> [float32] >> prefill_tiles_ab_<date>.jsonl

Modes: ``tiles`` (the kernel, as served on an AMX CPU; ``fma`` in float32) and ``flash``
(``cpu_kernels.supports_prefill`` patched to refuse, so attention.py takes torch's path). Default model,
bfloat16 unless float32 is named, one torch thread, one engine kept for the whole run (prefill_ab.py's
reason); a warm-up 2,000-token prompt, then per round and mode a 2,000-token and a 6,000-token prompt, each
alone and never seen before, to its first token (tokens/s). One JSON line per measurement.
"""

import json
import os
import sys
import time

import torch

# run as a script, this folder is on sys.path: the one-prompt measurement is stack_ab's
from stack_ab import engine_for, prefill  # type: ignore[import-not-found]

from server.engine import cpu_kernels
from server.engine.model import load_base_model


def main() -> None:
    torch.set_num_threads(1)
    dtype = sys.argv[2] if len(sys.argv) > 2 else "bfloat16"
    base = load_base_model("default", getattr(torch, dtype), "cpu")
    engine = engine_for(base)
    prefill(engine, 2000, 1)
    supported = cpu_kernels.supports_prefill
    for r in range(int(sys.argv[1])):
        for m, mode in enumerate(("tiles" if dtype == "bfloat16" else "fma", "flash")):
            cpu_kernels.supports_prefill = supported if mode != "flash" else (lambda *args: False)
            seed = 10 + 2 * r + m  # a prompt of its own: the engine caches the blocks of prompts it has seen
            row = {"round": r, "mode": mode, "dtype": dtype, "p2000": round(prefill(engine, 2000, seed), 1),
                   "p6000": round(prefill(engine, 6000, 100 + seed), 1),
                   "load1": round(os.getloadavg()[0], 2),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
