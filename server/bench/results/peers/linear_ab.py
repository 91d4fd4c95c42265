"""How ``amx_ab_<date>.jsonl`` and ``linear_ab_<date>.jsonl`` were made: decode with the C linear kernels for
a step's several rows (server/engine/cpu_linears.c) against the libraries they replace, one checkout, one
process, the modes alternated within each round::

    PYTHONPATH=. python server/bench/results/peers/linear_ab.py <dtype> <rounds> >> linear_ab_<date>.jsonl

bfloat16 modes: ``kernel`` (as served on an AMX CPU: 2-64 rows through ``linear_amx``) and ``library``
(``AMX_MAX_ROWS = 1``: 2 rows take the AVX512-BF16 kernel, more take oneDNN's packed linear, as at stop 31).
float32 modes: ``kernel`` (2-128 rows through ``linear_f32``) and ``library`` (``F32_MAX_ROWS = 1``: MKL's
F.linear). amx_ab_2026-12-07.jsonl is the bfloat16 run of this script's first version (at 60effde, modes named
``amx`` and ``onednn``). Default model, one torch thread; decode tokens/s at 1, 8 and 32 streams
(stack_ab.decode: 32-token prompts, 40 steps timed after all are prefilled). One JSON line per measurement.
"""

import json
import os
import sys
import time

import torch

# run as a script, this folder is on sys.path: the decode measurement is stack_ab's
from stack_ab import decode  # type: ignore[import-not-found]

from server.engine import cpu_kernels
from server.engine.model import load_base_model


def main() -> None:
    dtype, rounds = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    base = load_base_model("default", getattr(torch, dtype), "cpu")
    limit = "AMX_MAX_ROWS" if dtype == "bfloat16" else "F32_MAX_ROWS"
    rows = getattr(cpu_kernels, limit)
    for r in range(rounds):
        for mode in ("kernel", "library"):
            setattr(cpu_kernels, limit, rows if mode == "kernel" else 1)
            figures = {"decode_1": decode(base, 1, 5), "decode_8": decode(base, 8, 5),
                       "decode_32": decode(base, 32, 5)}
            print(json.dumps({"round": r, "mode": mode, "dtype": dtype, "amx": cpu_kernels.amx(),
                              **{k: round(v, 2) for k, v in figures.items()},
                              "load1": round(os.getloadavg()[0], 2),
                              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}), flush=True)


if __name__ == "__main__":
    main()
