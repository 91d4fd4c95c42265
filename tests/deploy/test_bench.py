"""`prefix-serve bench`: the load generator's measurement windows, and one whole run on a tiny model.

The window tests use hand-made client timings whose right answer is known; the end-to-end test runs the
real command (bare model, engine, `generate` baselines, a real server process over HTTP) at toy sizes and
checks that every figure the report is built from was measured, not that it is fast.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from prefixes.artifact import ModelShape
from server.bench.load import RequestResult, decode_token_throughput, steady_token_throughput
from server.bench.serving import register_tasks
from tests.helpers.server_process import ServerProcess
from tests.helpers.support import save_tiny_llama

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

REPO_ROOT = Path(__file__).resolve().parents[2]


def stream(start: float, first: float, last: float, step: float) -> RequestResult:
    """A request sent at ``start`` whose tokens arrive every ``step`` seconds from ``first`` to ``last``."""
    count = round((last - first) / step) + 1
    times = [first + i * step for i in range(count)]
    return RequestResult(start=start, end=last + 0.01, first_token=first, token_times=times, tokens=count)


def test_decode_window_runs_from_the_last_first_token_to_the_first_last_token():
    # Three streams sent at once; prefill ends at 1.0, 1.5 and 2.0; then one token per stream every 0.1 s.
    # Stream a ends at 4.0. In (2.0, 4.0] every stream decodes: 20 steps x 3 tokens over 2 s.
    a = stream(0.0, 1.0, 4.0, 0.1)
    b = stream(0.0, 1.5, 5.0, 0.1)
    c = stream(0.0, 2.0, 6.0, 0.1)
    assert decode_token_throughput([a, b, c]) == pytest.approx(30.0, rel=1e-6)
    # The tokens a and b made before c's prefill and after a finished do not count.
    assert decode_token_throughput([a, b]) == pytest.approx(20.0, rel=1e-6)


def test_decode_window_is_none_without_one():
    a = stream(0.0, 1.0, 2.0, 0.1)
    late = stream(0.0, 3.0, 4.0, 0.1)  # starts decoding after a has finished: no common window
    assert decode_token_throughput([a, late]) is None
    one_token = RequestResult(start=0.0, end=1.0, first_token=0.5, token_times=[0.5], tokens=1)
    assert decode_token_throughput([a, one_token]) is None
    failed = RequestResult(start=0.0, end=1.0, first_token=None, ok=False)
    assert decode_token_throughput([a, failed]) is None


def test_steady_window_is_while_every_client_is_busy():
    # Two clients, three requests: the first wave's first tokens at 1.0 and 1.2, the last request sent at 3.0.
    # Tokens every 0.1 s per stream; in [1.2, 3.0] both first-wave streams are busy: 19 + 19 tokens (a's run
    # to 3.0 inclusive, b's too), plus the third request's first token, which arrives after 3.0.
    a = stream(0.0, 1.0, 3.0, 0.1)
    b = stream(0.1, 1.2, 4.0, 0.1)
    third = stream(3.0, 3.2, 5.0, 0.1)
    window = 3.0 - 1.2
    expected = (sum(1.2 <= t <= 3.0 for t in a.token_times)
                + sum(1.2 <= t <= 3.0 for t in b.token_times)) / window
    assert steady_token_throughput([a, b, third], concurrency=2) == pytest.approx(expected)
    assert expected == pytest.approx(38 / window, rel=1e-6)
    assert steady_token_throughput([a, b], concurrency=2) is None  # no request after the first wave


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=512)


def test_bench_runs_end_to_end_and_reports_every_target(tiny_model, tmp_path):
    out = tmp_path / "results"
    # Long enough that every burst has a window in which all streams decode: a tiny model's step takes
    # milliseconds, and a stream's tokens can arrive coalesced into one chunk when the client lags.
    new_tokens = 32
    cmd = [sys.executable, "-m", "server.cli", "bench", "--model", str(tiny_model), "--concurrency", "4",
           "--prompt-tokens", "8", "--new-tokens", str(new_tokens), "--virtual-tokens", "4", "--rounds", "2",
           "--serial-requests", "1", "--scale-tasks", "1,3", "--sweep", "1,4", "--rate", "8",
           "--threads", "1",
           "--no-overload",  # the overload section has its own test below
           "--no-kv",  # so has the key/value memory section
           "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "latest.json").read_text())
    decode = result["http"]["decode"]
    for key in ("ceiling", "mixed", "single"):  # one figure per round for each, all measured
        assert len(decode[key]) == 2 and all(v and v > 0 for v in decode[key]), decode
    for row in result["http"]["sweep"]:
        for load in (row["mixed"], row["single"]):
            assert load["failed"] == 0
            # every request streamed exactly the tokens it asked for (ignore_eos), so the rates count
            # real tokens
            assert load["token_throughput"] * load["wall_s"] == pytest.approx(load["requests"] * new_tokens)
    assert [row["tasks"] for row in result["offline"]["scale"]] == [1, 3]
    prefill = result["offline"]["prefill"]  # a prompt of half the tiny model's 512 positions
    assert prefill["prompt_tokens"] == 256 and len(prefill["samples"]["engine"]) == 2
    assert prefill["engine_tokens_per_s"] > 0 and prefill["bare_tokens_per_s"] > 0
    markdown = (out / "latest.md").read_text()
    verdicts = [line for line in markdown.splitlines() if line.endswith(("| PASS |", "| FAIL |"))]
    assert len(verdicts) == 6, markdown
    assert "server decode tokens/s (HTTP, 4 streams on 4 tasks)" in markdown
    assert "| prefill of a 256-token prompt: engine / bare forward pass (the ceiling) = " in markdown
    assert markdown in run.stdout
    assert (out / "latest.png").stat().st_size > 10_000
    # progress as it goes: each phase's start and end and each round's figures, printed before the report
    progress = run.stdout[:run.stdout.index(markdown)]
    for line in ("[bench] 1/4 in process", "[bench] offline round 1/2 (tok/s): bare forward",
                 "[bench] offline round 2/2", "[bench] transformers generate, one request at a time:",
                 "[bench] 3/4 a real server over HTTP", "[bench] HTTP concurrency 4:"):
        assert line in progress, run.stdout[:3000]
    assert progress.count(": done in ") == 2, progress  # the two phases this run has (no kv, no overload)


def requests_served(url: str) -> int:
    """Requests the server counts as finished at their length (``ignore_eos``), from its /metrics."""
    text = httpx.get(f"{url}/metrics").text
    finished = r'^prefix_serve_requests_total\{[^}]*outcome="length"[^}]*\} (\S+)$'
    return sum(int(float(v)) for v in re.findall(finished, text, re.MULTILINE))


def test_bench_url_measures_a_server_it_did_not_start(tiny_model, tmp_path):
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", model=str(tiny_model)) as server:
        shape = ModelShape(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, max_positions=512,
                           model_type="llama")  # save_tiny_llama's
        names = register_tasks(server.url, shape, 2, virtual_tokens=4)
        new_tokens, duration = 8, 2.0
        cmd = [sys.executable, "-m", "server.cli", "bench", "--url", server.url, "--duration", str(duration),
               "--tasks", ",".join(names), "--sweep", "1,3", "--prompt-tokens", "8", "--new-tokens",
               str(new_tokens), "--out", str(tmp_path / "remote")]
        run = subprocess.run(cmd, cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads((tmp_path / "remote" / "remote.json").read_text())
        assert [row["concurrency"] for row in result["sweep"]] == [1, 3]
        sent = 0
        for row in result["sweep"]:
            load = row["load"]
            assert load["failed"] == 0 and load["requests"] >= row["concurrency"]
            assert load["wall_s"] >= duration  # requests kept going out until the duration had passed
            assert load["token_throughput"] * load["wall_s"] == pytest.approx(load["requests"] * new_tokens)
            assert load["ttft_s"]["p50"] > 0 and load["itl_s"]["p50"] > 0
            sent += load["requests"]
        assert requests_served(server.url) == sent  # the running server served every one of them
        markdown = (tmp_path / "remote" / "remote.md").read_text()
        assert markdown in run.stdout and "| 3 |" in markdown

        # a task the server does not have is refused before any load is sent, with what to do about it
        missing = subprocess.run([*cmd[:cmd.index("--tasks") + 1], "no-such-task"], cwd=REPO_ROOT,
                                 check=False, capture_output=True, text=True, timeout=120)
        assert missing.returncode == 2 and "no-such-task" in missing.stderr and "upload it" in missing.stderr
        assert requests_served(server.url) == sent


def test_overload_section_measures_decode_behind_a_queue_and_a_burst():
    """The overload section on real default-model servers at toy sizes: every decode figure is measured with
    the queue really that deep, and the burst is answered with 200s and immediate 503s + Retry-After only."""
    import argparse

    from server.bench import overload

    args = argparse.Namespace(concurrency=2, overload_waiting=[0, 4], overload_window=1.0, new_tokens=8,
                              dtype="float32", device="cpu", threads=1, max_step_tokens=512)
    result = overload.run_served("default", args)
    assert next(c["name"] for c in result["configs"]) == "default" and len(result["configs"]) == 3
    for config in result["configs"]:
        points = config["decode"]
        assert [(p["cpu_hog"], p["waiting"]) for p in points] == [
            (False, 0), (False, 4), (True, 0), (True, 4)]
        assert all(p["running"] == 2 and p["decode_tokens_per_s"] > 0 for p in points), points
        assert config["engine_threads"] >= 1
    burst = result["burst"]
    # twice what the default queue admits (2 running + 2 x 2 waiting)
    assert burst["requests"] == 12 and burst["other_status"] == []
    assert burst["accepted"] >= 6 and burst["rejected"] >= 1
    assert burst["rejections_with_retry_after"] == burst["rejected"]
    assert overload.queue_ratio(result["configs"][0]["decode"]) > 0
    assert "| 4 |" in overload.render(result)


def test_kv_workloads_measure_what_the_paged_cache_changes(tokenizer, tmp_path):
    """The key/value section on a tiny model: every figure is measured, a shared preamble is served from the
    prefix cache the second time, short requests get first tokens while a long prompt prefills, and the
    paged cache holds about one token's bytes per token (not the batch's widest row for every row)."""
    from server.bench import kv
    from server.engine.model import load_base_model

    folder = save_tiny_llama(tmp_path / "tiny", tokenizer, max_positions=4096)
    base = load_base_model(str(folder), torch.float32, "cpu")
    # the first short request arrives with the long prompt (a tiny model prefills 1,800 tokens in well under
    # the default 0.2 s): it shares the long prompt's steps, so it gets its first token before it
    result = kv.run(base, max_step_tokens=64, virtual_tokens=4, long_prompt=1800, preamble=100, rounds=1,
                    first_arrival=0.0)
    mix = result["length_mix"]
    assert mix["peak_running"] > 1
    assert mix["shorts_first_token_before_long"] > 0
    assert result["shared_preamble"]["warm_cached_tokens_mean"] >= 96  # 100-token preamble, blocks of 16
    assert result["decode"]["short_decode_tokens_per_s"] > 0
    assert result["decode"]["short_decode_beside_long_tokens_per_s"] > 0
    per_token = result["kv_bytes"]["bytes_per_token_held"] / result["kv_bytes"]["bytes_per_token"]
    assert per_token < 1.2  # partial last blocks only, and the task prefix once for all 32
    table = kv.render(None, result)
    assert f"| length mix: peak running (of 33) | - | {mix['peak_running']} |" in table
