"""How ``rope_ab_<date>.jsonl`` was made: the Llama stack's rotary embedding and cache write as one C pass
(cpu_kernels.c, ``rope_cache_bf16``) against torch's ops (two rotations, two ``index_copy_``), one process,
the modes alternated within each round::

    cd server/bench/results/peers
    PYTHONPATH=<checkout> python rope_ab.py <rounds> >> rope_ab_<date>.jsonl

Modes: ``fused`` (as served, bfloat16 on AVX512-BF16) and ``torch`` (``cpu_kernels.supports_rope`` patched to
refuse). Default model, bfloat16, one torch thread: decode tokens/s at 1 and 32 streams (stack_ab.decode) and
a 6,000-token prompt's prefill tokens/s on a long-lived engine (a prompt of its own per measurement, as
prefill_tiles_ab.py). One JSON line per measurement.
"""

import json
import os
import sys
import time

import torch

# run as a script, this folder is on sys.path: the measurements are stack_ab's
from stack_ab import decode, engine_for, prefill  # type: ignore[import-not-found]

from server.engine import cpu_kernels
from server.engine.model import load_base_model


def main() -> None:
    torch.set_num_threads(1)
    base = load_base_model("default", torch.bfloat16, "cpu")
    engine = engine_for(base)
    prefill(engine, 2000, 1)
    supported = cpu_kernels.supports_rope
    for r in range(int(sys.argv[1])):
        for m, mode in enumerate(("fused", "torch")):
            cpu_kernels.supports_rope = supported if mode == "fused" else (lambda *args: False)
            row = {"round": r, "mode": mode, "decode_1": round(decode(base, 1, 5), 2),
                   "decode_32": round(decode(base, 32, 5), 2),
                   "p6000": round(prefill(engine, 6000, 200 + 2 * r + m), 1),
                   "load1": round(os.getloadavg()[0], 2),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
