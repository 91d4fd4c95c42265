"""Turning a benchmark result into the markdown table (targets marked PASS/FAIL) and the plot."""

from __future__ import annotations

from pathlib import Path

from server.bench.overload import queue_ratio
from server.bench.overload import render as render_overload


def median(values: list[float]) -> float:
    """The middle value (the upper one of an even count): rounds are few, and this is a measured value."""
    return sorted(values)[len(values) // 2]


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of per-round ratios: each pair ran back to back, so a round's ratio cancels the drift
    that hits one round more than another."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


def targets(result: dict) -> list[tuple[str, float, str, bool]]:
    """(what, value, target, passed) for every target of the performance issue that this run measured."""
    off = result["offline"]
    rows = []
    http_top = result["http"]["sweep"][-1] if "http" in result else None
    serving = http_top["mixed"]["token_throughput"] if http_top else off["engine_end_to_end_tokens_per_s"]
    where = f"HTTP, concurrency {http_top['concurrency']}" if http_top else "in-process"
    decode = result["http"].get("decode") if "http" in result else None
    n = result["concurrency"]
    if decode and all(decode["mixed"]):
        # Decode against decode: each round's burst over HTTP against the ceiling timed just before it.
        ratio = median_ratio(decode["mixed"], decode["ceiling"])
        rows.append(((f"server decode tokens/s (HTTP, {n} streams on {n} tasks) / bare forward at batch {n} "
                      "(median of per-round ratios)"), ratio, ">= 0.8", ratio >= 0.8))
    elif off.get("samples", {}).get("ceiling"):
        ratio = median_ratio(off["samples"]["mixed"], off["samples"]["ceiling"])
        rows.append((f"engine decode tokens/s (in process, {n} tasks) / bare forward at batch {n}", ratio,
                     ">= 0.8", ratio >= 0.8))
    samples = off.get("samples", {})
    if samples.get("mixed") and len(samples["mixed"]) == len(samples.get("single", [])):
        ratio = median_ratio(samples["mixed"], samples["single"])
    else:
        ratio = off["engine_decode_mixed_tokens_per_s"] / off["engine_decode_single_tokens_per_s"]
    rows.append((f"decode, {result['concurrency']} tasks / one task (same load, median of per-round ratios)",
                 ratio, ">= 0.95", ratio >= 0.95))
    ratio = serving / off["generate_one_at_a_time_tokens_per_s"]
    rows.append((f"prefix-serve ({where}) / `generate` one request at a time", ratio, ">= 8", ratio >= 8))
    ratio = off["engine_end_to_end_tokens_per_s"] / off["generate_static_per_task_tokens_per_s"]
    rows.append(("prefix-serve / per-task static batches (tasks x 2 requests)", ratio, ">= 5", ratio >= 5))
    extra_ms = off["load_ms"]["disk_ms"] - off["load_ms"]["resident_ms"]
    rows.append(("cold task's extra time to first token, from disk (ms)", extra_ms, "<= 20", extra_ms <= 20))
    top = off["scale"][-1]
    overhead = top["rss_growth_bytes"] / max(top["resident_growth_bytes"], 1)
    rows.append((f"memory for {top['tasks']} resident tasks / their tensors", overhead, "<= 1.10",
                 overhead <= 1.10))
    if "overload" in result:
        queued = queue_ratio(result["overload"]["configs"][0]["decode"])  # the server's default settings
        deepest = max(result["overload"]["waiting"])
        if queued is not None:
            rows.append((f"server decode with {deepest} requests waiting / with none (HTTP, one run)", queued,
                         ">= 0.9", queued >= 0.9))
    return rows


def latency_cells(load: dict) -> list[str]:
    """A load summary's TTFT p50 / p99 (s), inter-token latency p50 / p99 (ms), end to end p50 / p90 / p99
    (s)."""
    ttft, itl, e2e = load["ttft_s"], load["itl_s"], load["e2e_s"]
    return [f"{ttft.get('p50', 0):.2f} / {ttft.get('p99', 0):.2f}",
            f"{1e3 * itl.get('p50', 0):.0f} / {1e3 * itl.get('p99', 0):.0f}",
            f"{e2e.get('p50', 0):.2f} / {e2e.get('p90', 0):.2f} / {e2e.get('p99', 0):.2f}"]


def render_markdown(result: dict) -> str:
    off = result["offline"]
    n = result["concurrency"]
    lines = [
        (f"**{result['model']}** on {result['device']} ({result['dtype']}, {result['threads']} threads); "
         f"prompt {result['prompt_tokens']} tokens, prefix {result['virtual_tokens']} virtual tokens, "
         f"{result['new_tokens']} new tokens; at most {result.get('max_step_tokens', '?')} tokens per engine "
         f"step; medians of {result['rounds']} alternating rounds"),
        "",
        "| measurement | tokens/s |",
        "|---|---|",
        f"| bare forward pass, batch {n} (the ceiling) | {off['ceiling_decode_tokens_per_s']:.1f} |",
        f"| engine decode, {n} requests on {n} tasks | {off['engine_decode_mixed_tokens_per_s']:.1f} |",
        f"| engine decode, {n} requests on one task | {off['engine_decode_single_tokens_per_s']:.1f} |",
        (f"| bare model doing the same work: one prefill of {n} prompts, then decode | "
         f"{off['bare_same_work_tokens_per_s']:.1f} |"),
        (f"| engine, {n} at a time, {2 * n} requests (closed loop, no HTTP) | "
         f"{off['engine_closed_loop_tokens_per_s']:.1f} |"),
        f"| engine end to end, tasks x 2 requests at once | {off['engine_end_to_end_tokens_per_s']:.1f} |",
        (f"| transformers `generate`, one request at a time | "
         f"{off['generate_one_at_a_time_tokens_per_s']:.1f} |"),
        (f"| transformers `generate`, per-task static batches of 2 | "
         f"{off['generate_static_per_task_tokens_per_s']:.1f} |"),
    ]
    prefill = off.get("prefill")
    if prefill:
        lines += [(f"| prefill of a {prefill['prompt_tokens']:,}-token prompt: engine / bare forward pass "
                   f"(the ceiling) = {prefill['engine_tokens_per_s'] / prefill['bare_tokens_per_s']:.2f} | "
                   f"{prefill['engine_tokens_per_s']:.1f} / {prefill['bare_tokens_per_s']:.1f} |")]
    decode = result.get("http", {}).get("decode")
    if decode and all(decode["mixed"]) and all(decode["single"]):
        lines += [(f"| server over HTTP, {n} streams all decoding, on {n} tasks / on one task "
                   f"(ceiling timed beside it: {median(decode['ceiling']):.1f}) | "
                   f"{median(decode['mixed']):.1f} / {median(decode['single']):.1f} |")]
    if "http" in result:
        lines += ["", ("| HTTP concurrency | mixed tok/s (all busy) | one task tok/s (all busy) "
                       "| TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | e2e p50 / p90 / p99 (s) |"),
                  "|---|---|---|---|---|---|"]
        busy = lambda m: f" ({m['steady_token_throughput']:.1f})" if m.get("steady_token_throughput") else ""
        for row in result["http"]["sweep"]:
            m, one = row["mixed"], row["single"]
            cells = [str(row["concurrency"]), f"{m['token_throughput']:.1f}{busy(m)}",
                     f"{one['token_throughput']:.1f}{busy(one)}", *latency_cells(m)]
            lines.append("| " + " | ".join(cells) + " |")
        p = result["http"]["poisson"]
        lines.append(f"\nPoisson arrivals at {p['rate']}/s over a Zipf task mix: "
                     f"{p['request_throughput']:.2f} req/s, {p['token_throughput']:.1f} tok/s, "
                     f"e2e p99 {p['e2e_s']['p99']:.2f} s, "
                     f"TTFT p99 {p['ttft_s'].get('p99', 0):.2f} s")
    lines += ["", "| registered tasks (Zipf mix) | decode tok/s | resident MB | process growth MB |",
              "|---|---|---|---|"]
    for row in off["scale"]:
        lines.append(f"| {row['tasks']} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['resident_bytes'] / 2**20:.1f} | {row['rss_growth_bytes'] / 2**20:.1f} |")
    lines.append(f"\nA resident task costs {off['bytes_per_task'] / 2**10:.0f} KiB; a model copy per task "
                 f"would cost {off['model_bytes'] / 2**20:.0f} MiB "
                 f"({off['model_bytes'] / off['bytes_per_task']:.0f}x). "
                 f"Making a task servable: {off['load_ms']['disk_ms']:.2f} ms from disk, "
                 f"{off['load_ms']['resident_ms']:.3f} ms when resident.")
    lines += ["", "| target | value | wanted | |", "|---|---|---|---|"]
    for what, value, wanted, ok in targets(result):
        lines.append(f"| {what} | {value:.2f} | {wanted} | {'PASS' if ok else 'FAIL'} |")
    if "bare_same_work_tokens_per_s" in off:
        # The ceiling above is decode alone; serving requests also costs their prefill. These ratios show
        # how much of the gap is the workload's prefill (which the bare model pays too) and how much is the
        # server.
        same = off["bare_same_work_tokens_per_s"]
        parts = [f"bare same work / bare decode = {same / off['ceiling_decode_tokens_per_s']:.2f}",
                 f"engine closed loop / bare same work = {off['engine_closed_loop_tokens_per_s'] / same:.2f}"]
        if "http" in result:
            top = result["http"]["sweep"][-1]
            busy = top["mixed"].get("steady_token_throughput")
            served = busy or top["mixed"]["token_throughput"]
            parts.append(f"HTTP at concurrency {top['concurrency']}{' (all busy)' if busy else ''} "
                         f"/ bare same work = {served / same:.2f}, "
                         f"/ bare decode = {served / off['ceiling_decode_tokens_per_s']:.2f}")
        lines.append("\nPrefill included: " + "; ".join(parts) + ".")
    if "overload" in result:
        lines.append(render_overload(result["overload"]))
    return "\n".join(lines)


def render_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["http"]["sweep"]
    c = [row["concurrency"] for row in sweep]
    off = result["offline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("mixed", "prefix-serve, Zipf mix of tasks"), ("single", "prefix-serve, one task")):
        left.plot(c, [row[key]["token_throughput"] for row in sweep], marker="o", label=label)
        right.plot(c, [row[key]["e2e_s"]["p99"] for row in sweep], marker="o", label=label)
    serial = off["generate_one_at_a_time_tokens_per_s"]
    left.plot(c, [serial] * len(c), linestyle="--", label="`generate`, one request at a time")
    left.plot(c, [off["generate_static_per_task_tokens_per_s"]] * len(c), linestyle="--",
              label="`generate`, per-task batches of 2")
    left.axhline(off["ceiling_decode_tokens_per_s"], color="grey", linestyle=":",
                 label=f"bare forward, batch {result['concurrency']}")
    # a one-at-a-time server's p99 at concurrency k: the last of k requests waits for all k
    per_request = result["new_tokens"] / serial
    right.plot(c, [k * per_request for k in c], linestyle="--", label="`generate` one at a time (queueing)")
    left.set(xlabel="concurrent requests", ylabel="generated tokens/s", title="Throughput")
    right.set(xlabel="concurrent requests", ylabel="seconds", title="End-to-end latency p99")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']} on {result['device']} ({result['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
