"""How ``amx_ab_<date>.jsonl`` was made: decode with the AMX linear kernel (cpu_kernels.c, ``linear_amx``)
against the previous stop's linears (oneDNN above 2 rows), one checkout, one process, alternating::

    PYTHONPATH=. python server/bench/results/peers/amx_ab.py <rounds> >> amx_ab_<date>.jsonl

Modes: ``amx`` (as served on an AMX CPU: 2-64 rows through the tiles) and ``onednn`` (``AMX_MAX_ROWS = 1``:
2 rows take the AVX512-BF16 kernel, more take oneDNN's packed linear, as at stop 31). Default model,
bfloat16, one torch thread; decode tokens/s at 1, 8 and 32 streams (stack_ab.decode: 32-token prompts, 40
steps timed after all are prefilled). One JSON line per measurement.
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
    rounds = int(sys.argv[1])
    torch.set_num_threads(1)
    base = load_base_model("default", torch.bfloat16, "cpu")
    rows = cpu_kernels.AMX_MAX_ROWS
    for r in range(rounds):
        for mode in ("amx", "onednn"):
            cpu_kernels.AMX_MAX_ROWS = rows if mode == "amx" else 1
            figures = {"decode_1": decode(base, 1, 5), "decode_8": decode(base, 8, 5),
                       "decode_32": decode(base, 32, 5)}
            print(json.dumps({"round": r, "mode": mode, "amx": cpu_kernels.amx(),
                              **{k: round(v, 2) for k, v in figures.items()},
                              "load1": round(os.getloadavg()[0], 2),
                              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}), flush=True)


if __name__ == "__main__":
    main()
