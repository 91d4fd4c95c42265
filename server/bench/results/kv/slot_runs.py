"""The long row's attention alone (30 layers, one query, 6,001 keys): gathered then attended, against its runs
of consecutive slots (6,001, 3,000, 1,024 or 256 long, gaps between) read as views and merged by log-sum-exp
("lse_runs", what attention._attend_runs does) or by one softmax over concatenated scores ("manual").
``THREADS=1 python server/bench/results/kv/slot_runs.py [rounds]``; output in slot_runs_2026-12-07.txt."""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
Hkv, G, D, W = 3, 3, 64, 6001
N = 120000
pk, pv = torch.randn(N, Hkv, D), torch.randn(N, Hkv, D)
q = torch.randn(1, Hkv, G, D)


def make_slots(run):
    # runs of `run` consecutive slots, separated by gaps (another row's blocks)
    out, base = [], 0
    while len(out) < W:
        n = min(run, W - len(out))
        out += list(range(base, base + n))
        base += n + 512
    return out


def runs_of(slots):
    r, a = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            r.append((slots[a], i - a))
            a = i
    return r


def gathered(sl):
    k = pk.index_select(0, sl).transpose(0, 1)[None]
    v = pv.index_select(0, sl).transpose(0, 1)[None]
    return F.scaled_dot_product_attention(q, k, v)


def lse_runs(runs):
    outs, lses = [], []
    for s, n in runs:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, pk[s : s + n].transpose(0, 1)[None], pv[s : s + n].transpose(0, 1)[None], 0.0, False
        )
        outs.append(o)
        lses.append(l)
    if len(outs) == 1:
        return outs[0]
    l = torch.stack(lses)  # [R, 1, Hkv, G]
    w = torch.softmax(l, 0).unsqueeze(-1)
    return (torch.stack(outs) * w).sum(0)


def manual(runs):
    qs = q[0] * D**-0.5  # [Hkv, G, D]
    sc = torch.cat([torch.matmul(qs, pk[s : s + n].permute(1, 2, 0)) for s, n in runs], -1)  # [Hkv, G, W]
    p = sc.softmax(-1)
    out, at = None, 0
    for s, n in runs:
        part = torch.matmul(p[..., at : at + n], pv[s : s + n].transpose(0, 1))
        at += n
        out = part if out is None else out.add_(part)
    return out[None]


with torch.inference_mode():
    for run in (6001, 3000, 1024, 256):
        sl = make_slots(run)
        st = torch.tensor(sl)
        runs = runs_of(sl)
        ref = gathered(st)
        for f, a in ((lse_runs, runs), (manual, runs)):
            assert torch.allclose(f(a), ref, atol=1e-5), f.__name__
        t: dict[str, list[float]] = {"gathered": [], "lse_runs": [], "manual": []}
        for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
            for name, f, a in (
                ("gathered", gathered, st),
                ("lse_runs", lse_runs, runs),
                ("manual", manual, runs),
            ):
                s = time.perf_counter()
                for _ in range(30):
                    f(a)
                t[name].append(time.perf_counter() - s)
        g = statistics.median(t["gathered"])
        print(
            f"run {run} ({len(runs)} runs): "
            + ", ".join(
                f"{k} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / g:.2f}x)"
                for k, v in t.items()
            ),
            flush=True,
        )
