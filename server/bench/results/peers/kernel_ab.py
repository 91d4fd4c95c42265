"""How ``kernel_ab_<date>.jsonl`` was made: decode with the C kernels (server/engine/cpu_kernels.c) against
torch's path, one checkout, one process, the modes alternated within each round::

    PYTHONPATH=. python server/bench/results/peers/kernel_ab.py <dtype> <rounds> >> kernel_ab_<date>.jsonl

Modes: ``both`` (decode attention and the few-row bf16 linear, as served), ``attention`` (the linear kept on
oneDNN: ``LINEAR_MAX_ROWS = 0``), ``off`` (``PREFIX_SERVE_CPU_KERNELS=0``: gather + SDPA, oneDNN). Default
model, one torch thread (the served setting); decode tokens/s at 1 and 32 streams (stack_ab.decode: 32-token
prompts, 40 steps timed after all are prefilled) and at 1 stream whose prompt was 4,000 tokens (a long row:
torch's path reads its runs of slots as views, merged_attention.attend_runs). One JSON line per measurement.
"""

import json
import os
import sys
import time

import torch

# run as a script, this folder is on sys.path: the decode measurement is stack_ab's
from stack_ab import _ids, decode, engine_for  # type: ignore[import-not-found]

from server.engine import cpu_kernels
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams, Sequence


def long_row_decode(base, prompt: int) -> float:
    engine = engine_for(base)
    seq = Sequence(_ids(3, prompt), SamplingParams(max_new_tokens=60, ignore_eos=True))
    engine.submit(seq)
    while not seq.output_ids:
        engine.step()
    start = time.perf_counter()
    for _ in range(40):
        engine.step()
    return 40 / (time.perf_counter() - start)


def main() -> None:
    dtype, rounds = getattr(torch, sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    base = load_base_model("default", dtype, "cpu")
    rows = cpu_kernels.LINEAR_MAX_ROWS
    for r in range(rounds):
        for mode in ("both", "attention", "off"):
            os.environ[cpu_kernels.ENV_SWITCH] = "0" if mode == "off" else "1"
            cpu_kernels.library.cache_clear()
            cpu_kernels.LINEAR_MAX_ROWS = 0 if mode == "attention" else rows
            figures = {"decode_1": decode(base, 1, 5), "decode_32": decode(base, 32, 5),
                       "decode_1_after_4000": long_row_decode(base, 4000)}
            print(json.dumps({"round": r, "mode": mode, "dtype": sys.argv[1],
                              **{k: round(v, 2) for k, v in figures.items()},
                              "load1": round(os.getloadavg()[0], 2),
                              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}), flush=True)

if __name__ == "__main__":
    main()
