"""`server/bench/gpu-check.sh`, the GPU check, run for real in its CPU mode: the script's benchmark part on a
tiny random model must write a figures file in which every field was measured.

What the GPU adds (CUDA events, real sizes) cannot run here; everything around it does: the script's
phases, `bench --model random:NAME --batch-sizes`, the bare forward, the engine on N tasks and on one, the
per-step timing of the engine, and a real server process over HTTP at each batch size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 32  # what the script's --small mode asks for


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.long  # the GPU check's bench part, run whole on the CPU: minutes (make test-long)
def test_gpu_check_bench_part_runs_on_cpu_and_measures_every_field(tmp_path):
    out = tmp_path / "gpu"
    # this interpreter has everything: the script installs nothing
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", "server/bench/gpu-check.sh", "--device", "cpu", "--small", "--skip-tests",
                          "--out", str(out)],
                         cwd=REPO_ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    result = json.loads((out / "tiny-cpu-float32.json").read_text())
    assert (result["model"], result["device"], result["new_tokens"]) == ("random:tiny", "cpu", NEW_TOKENS)

    batches = result["sweep"]["batches"]
    assert [row["batch"] for row in batches] == [1, 4]
    for row in batches:
        for ceiling in row["ceiling"]:
            assert all(positive(ceiling[k]) for k in ("tokens_per_s", "step_ms", "device_forward_ms",
                                                      "host_forward_ms"))
            assert 0 < ceiling["device_share"] <= 1
        assert row["mixed"] and row["single"] and all(map(positive, row["mixed"] + row["single"]))
        steps = row["steps"]
        # every decode step was timed: the prefill step gave each request its first token, then one step each
        assert steps["steps"] == NEW_TOKENS - 1
        assert all(positive(steps[k]) for k in ("tokens_per_s", "step_ms", "device_forward_ms",
                                                "host_forward_ms"))
        assert steps["device_forward_ms"] <= steps["step_ms"] and 0 <= steps["device_idle_share"] < 1

    http = result["sweep"]["http"]
    assert [row["batch"] for row in http["batches"]] == [1, 4]
    for row in http["batches"]:
        for load in row["mixed"] + row["single"]:
            assert load["requests"] == row["batch"] and load["failed"] == 0
            assert load["token_throughput"] * load["wall_s"] == pytest.approx(row["batch"] * NEW_TOKENS)
            assert positive(load["decode_token_throughput"]), load  # a window in which all streams decoded
            assert positive(load["ttft_s"]["p50"]) and positive(load["itl_s"]["p50"])

    summary = (out / "summary.md").read_text()
    assert summary.strip() == (out / "tiny-cpu-float32.md").read_text().strip()
    assert "| 4 |" in summary and "not run" not in summary and "no window" not in summary
    assert "Device idle between the engine's forwards:" in summary
    assert "gpu-check: all phases passed" in (out / "gpu-check.log").read_text()
