"""Where a 6,000-token decoding neighbour's cost goes: 32 short rows' decode step alone and beside it.

Two engines in one process: A decodes 32 short rows (32-token prompts), B the same 32 beside a 6,000-token
row (prefilled in one step). Steps alternate A and B, and within each the long row read by gathering its
slots ("old": ``runner.VIEW_MIN_WIDTH`` out of reach) or by views of its slot runs ("new"), in alternating
order round by round, so machine drift hits each alike; then torch.profiler tables of three steps of each,
and the long row's attention alone (one query, 6,000 keys, 30 layers): over contiguous keys, gathered first,
and the gather alone::

    THREADS=1 PYTHONPATH=. python server/bench/results/kv/neighbour.py [rounds] > neighbour_<date>.txt
"""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from server.engine import runner
from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import SamplingParams, Sequence

NEW, OLD = runner.VIEW_MIN_WIDTH, 10**9


def _ids(seed: int, n: int) -> list[int]:
    return [(7919 * seed + 31 * j) % 4000 + 100 for j in range(n)]


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _engines(base) -> tuple[Engine, Engine]:
    alone = Engine(base, EngineConfig(max_batch_size=33, max_step_tokens=512))
    for i in range(32):
        alone.submit(Sequence(_ids(i, 32), _params(1000)))
    beside = Engine(base, EngineConfig(max_batch_size=33, max_step_tokens=6144))
    long = Sequence(_ids(7, 6000), _params(1000))
    beside.submit(long)
    started = time.time()
    while not long.output_ids:
        beside.step()
    print("long prefill", time.time() - started, flush=True)
    for i in range(32):
        beside.submit(Sequence(_ids(i, 32), _params(1000)))
    for engine in (alone, beside):
        while engine.step() < engine.num_running or engine.num_waiting:
            pass
        for _ in range(3):
            engine.step()
    return alone, beside


def _steps(alone: Engine, beside: Engine, rounds: int) -> None:
    t: dict[str, list[float]] = {k: [] for k in ("alone old", "alone new", "beside old", "beside new")}
    for i in range(rounds):
        for name, engine in (("alone", alone), ("beside", beside)):
            for variant in ("old", "new") if i % 2 else ("new", "old"):
                runner.VIEW_MIN_WIDTH = NEW if variant == "new" else OLD
                s = time.perf_counter()
                engine.step()
                t[f"{name} {variant}"].append(time.perf_counter() - s)
    m = {k: statistics.median(v) for k, v in t.items()}
    print({k: f"{v * 1e3:.1f} ms" for k, v in m.items()})
    for v in ("old", "new"):
        print(f"{v}: shorts alone {32 / m['alone ' + v]:.1f} tok/s, "
              f"beside {32 / m['beside ' + v]:.1f} tok/s, "
              f"beside/alone {m['alone ' + v] / m['beside ' + v]:.3f}, "
              f"extra step time {1e3 * (m['beside ' + v] - m['alone ' + v]):.1f} ms")
    print(f"new/old: alone {m['alone old'] / m['alone new']:.3f} (speed), "
          f"beside {m['beside old'] / m['beside new']:.3f}")
    for name, engine, w in (("alone", alone, NEW), ("beside old", beside, OLD), ("beside new", beside, NEW)):
        runner.VIEW_MIN_WIDTH = w
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                engine.step()
        print(name)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _inherent() -> None:
    """One query (9 heads over 3 key/value heads) against 6,000 keys, 30 layers."""
    pool_k, pool_v = torch.randn(6100, 3, 64), torch.randn(6100, 3, 64)
    q, slots = torch.randn(1, 3, 3, 64), torch.arange(6001)

    def inherent():
        for _ in range(30):
            F.scaled_dot_product_attention(q, pool_k[:6001].transpose(0, 1)[None],
                                           pool_v[:6001].transpose(0, 1)[None])

    def gathered():
        for _ in range(30):
            F.scaled_dot_product_attention(q, pool_k.index_select(0, slots).transpose(0, 1)[None],
                                           pool_v.index_select(0, slots).transpose(0, 1)[None])

    def gather_only():
        for _ in range(30):
            pool_k.index_select(0, slots)
            pool_v.index_select(0, slots)

    res: dict[str, list[float]] = {f.__name__: [] for f in (inherent, gathered, gather_only)}
    for _ in range(15):
        for f in (inherent, gathered, gather_only):
            s = time.perf_counter()
            f()
            res[f.__name__].append(time.perf_counter() - s)
    print({k: f"{statistics.median(v) * 1e3:.2f} ms per step (30 layers)" for k, v in res.items()})


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    base = load_base_model("default", torch.float32, "cpu")
    alone, beside = _engines(base)
    _steps(alone, beside, int(sys.argv[1]) if len(sys.argv) > 1 else 15)
    with torch.inference_mode():
        _inherent()


if __name__ == "__main__":
    main()
