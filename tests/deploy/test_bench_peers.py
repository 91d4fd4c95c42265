"""`make bench-peers` without vLLM: the weights both servers load, and the workloads and the report run
against a real prefix-serve process on a tiny model.

vLLM itself is not installed here (minutes, and gigabytes); what these tests prove is every part of
server/bench/peers.py that is ours: the exported folder is a plain Hugging Face safetensors folder with the
very weights the server runs, every workload sends its requests over the OpenAI streaming API and gets the
tokens it asked for, and the report's ratios are ours / the peer's.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from server.bench import peers
from server.bench.load import RequestResult
from server.bench.peer_servers import cpu_info, export_model
from server.engine.model import load_base_model
from tests.helpers.support import save_tiny_llama

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_export_writes_the_embedded_models_weights_as_a_folder_both_servers_load(tmp_path):
    folder = export_model("default", tmp_path / "peers-model")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["max_position_embeddings"] >= 6200
    assert (folder / "tokenizer.json").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        # Hugging Face parameter names, which vLLM's Llama loader maps; float32, the dtype both cast from
        assert "model.layers.0.self_attn.q_proj.weight" in names and "model.embed_tokens.weight" in names
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    embedded, exported = (load_base_model(spec, torch.float32, "cpu") for spec in ("default", str(folder)))
    ids = torch.tensor([[1, 504, 3326, 314, 260, 2114, 30]])
    with torch.no_grad():
        assert torch.equal(embedded.model(ids).logits, exported.model(ids).logits)  # the very same weights
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert export_model("default", folder) == folder  # a finished export is reused, not written again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_sizes_fit_a_short_context():
    full = peers.Sizes.fitting(8192)
    assert (full.long_prompt, full.preamble, full.streams, full.new_tokens) == (6000, 600, 32, 128)
    short = peers.Sizes.fitting(512)
    assert short.long_prompt + short.short_new_tokens <= 512 and short.preamble == 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=512)


def test_peak_streaming_counts_requests_between_first_and_last_token():
    def streamed(first: float, last: float) -> RequestResult:
        return RequestResult(start=first - 0.1, end=last, first_token=first, token_times=[first, last],
                             tokens=2)

    one_after_another = [streamed(0, 1), streamed(2, 3), streamed(4, 5)]
    assert peers.peak_streaming(one_after_another) == 1
    # three overlapping at t=2.5; the fourth starts after the first two ended
    overlapping = [streamed(0, 3), streamed(1, 4), streamed(2, 6), streamed(5, 7)]
    assert peers.peak_streaming(overlapping) == 3
    # a request that never streamed a token (failed) is not counted
    failed = RequestResult(start=0, end=1, first_token=None, ok=False)
    assert peers.peak_streaming([streamed(0, 1), failed]) == 1


def test_peer_workloads_run_against_prefix_serve_alone_and_report_ratios(tiny_model, tmp_path):
    out = tmp_path / "peers"
    cmd = [sys.executable, "-m", "server.bench.peers", "--model", str(tiny_model), "--no-vllm", "--dtypes",
           "float32", "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [json_file] = out.glob("*.json")
    result = json.loads(json_file.read_text())
    assert result["cpu"]["model"] == cpu_info()["model"] and result["vllm_version"] is None
    ours = result["runs"]["float32"]["ours"]
    assert ours["start_s"] > 0 and "vllm" not in result["runs"]["float32"]
    figures = ours["workloads"]
    assert list(figures) == list(peers.WORKLOADS)
    # every workload got the tokens it asked for (peers._check raises otherwise), and each figure was timed
    assert figures["single"]["decode_tokens_per_s"] > 0
    assert figures["streams"]["output_tokens_per_s"] > 0 and figures["streams"]["itl_p50_s"] > 0
    assert figures["long_prompt"]["prompt_tokens"] == 472 and figures["long_prompt"]["ttft_s"] > 0
    assert 0 < figures["preamble"]["ttft_p50_s"] <= figures["preamble"]["ttft_p99_s"]
    assert figures["preamble"]["ttft_p99_s"] <= figures["preamble"]["wall_s"]
    mix = figures["length_mix"]
    # a measurement, not a promise: the tiny model can finish each short request before the next one arrives
    # (CI once read 1); how the peak is counted is proven on known times above
    assert mix["requests"] == 33 and 1 <= mix["peak_streaming"] <= 33
    markdown = json_file.with_suffix(".md").read_text()
    assert markdown in run.stdout and f"CPU: {result['cpu']['model']}" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| 1 stream x 128: decode tok/s |"))
    assert row.endswith("| - | - | > 1 |")  # no peer ran: no peer figure, no ratio

    # the ratio column is ours / the peer's: a peer twice as fast at decode and half as long to first token
    result["runs"]["float32"]["vllm"] = peer = copy.deepcopy(ours)
    peer["workloads"]["single"]["decode_tokens_per_s"] *= 2
    peer["workloads"]["long_prompt"]["ttft_s"] /= 2
    table = peers.render(result).splitlines()
    assert next(line for line in table if line.startswith("| 1 stream")).endswith("| 0.50 | > 1 |")
    assert next(line for line in table if line.startswith("| 472-token prompt")).endswith("| 2.00 | < 1 |")
