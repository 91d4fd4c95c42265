"""The name the base model is served under, which load tools and lm-eval look up on the Hugging Face hub for a
tokenizer: the embedded model under its hub id (its old id still accepted), ``--served-model-name`` as vLLM
has it; and the documented guidellm and aiperf command lines run against the real server, offline.

The two command lines are docs/benchmarks.md's blocks, run here as written (the URL made this server's).
guidellm 0.8 takes the first model /v1/models lists and loads a tokenizer by that name unless
``--tokenizer kind=huggingface_auto,model=PATH`` names a local folder: here the embedded model's converted
copy, which holds its tokenizer (``default_model_dir()``; ~/.cache/prefix-serve/models/SmolLM2-135M-Instruct
by default). aiperf 0.13 takes ``--tokenizer PATH`` (a path only without HF_HUB_OFFLINE=1: offline, it looks
every name up in the hub cache, paths too). An empty Hugging Face cache (``HF_HOME``) makes sure nothing else
could have given them a tokenizer.

aiperf is not among the project's dependencies; its test runs where an ``aiperf`` command is found (on PATH,
or ``AIPERF=/path/to/aiperf``; ``python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install
aiperf==0.13.0`` makes one), else it is skipped saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from server.cli import build_parser
from server.config import Settings
from server.engine.model import DEFAULT_MODEL_ID, default_model_dir
from tests.helpers.doc_blocks import PLACEHOLDER_URL, block_starting
from tests.helpers.model_folders import save_family
from tests.helpers.server_process import ServerProcess

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

OLD_ID = "SmolLM2-135M-Instruct"


def model_ids(server: ServerProcess) -> list[str]:
    return [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]


def complete(server: ServerProcess, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", timeout=120,
                      json={"model": model, "prompt": "The capital of France is", "max_tokens": 4,
                            "temperature": 0})


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-default")
    with ServerProcess(root / "store", root / "server.log") as server:
        yield server


@pytest.mark.slow
def test_the_embedded_model_is_served_under_its_hub_id(default_server):
    assert DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_ids(default_server) == [DEFAULT_MODEL_ID]  # the old id is accepted, not listed
    assert httpx.get(default_server.url + "/healthz").json()["model"] == DEFAULT_MODEL_ID
    card = httpx.get(f"{default_server.url}/v1/models/{DEFAULT_MODEL_ID}")  # a slash in the path
    assert card.status_code == 200 and card.json()["id"] == DEFAULT_MODEL_ID, card.text
    texts = []
    for model in (DEFAULT_MODEL_ID, OLD_ID):
        r = complete(default_server, model)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and "Paris" in texts[0], texts


def run_documented(block_start: str, server: ServerProcess, workdir, env: dict[str, str],
                   replace: tuple[str, str] | None = None) -> None:
    """Run docs/benchmarks.md's block as written (the URL made this server's) in ``workdir``, where ``.venv``
    is this test's environment, as after ``make install``; ``replace`` swaps one more string (a path)."""
    script = block_starting("docs/benchmarks.md", block_start).text.replace(PLACEHOLDER_URL, server.url)
    if replace:
        script = script.replace(*replace)
    (workdir / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    # the tokenizer folder the block names, wherever this machine keeps the converted model
    env = dict(env, PREFIX_SERVE_CACHE=str(default_model_dir().parents[1]))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_guidellm_command_line_as_documented(default_server, tmp_path):
    """The documented command: no model named (guidellm takes /v1/models' first, the hub id), the tokenizer
    from the local folder."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    run_documented("HF_HUB_OFFLINE=1 .venv/bin/guidellm run", default_server, tmp_path, env)
    report = (tmp_path / "guidellm.json").read_text()
    [benchmark] = json.loads(report)["benchmarks"]
    made = benchmark["scheduler_metrics"]["requests_made"]
    assert (made["successful"], made["errored"]) == (4, 0), made
    assert DEFAULT_MODEL_ID in report  # the model guidellm found and benchmarked


@pytest.mark.slow
def test_aiperf_command_line_as_documented(default_server, tmp_path):
    aiperf = os.environ.get("AIPERF") or shutil.which("aiperf")
    if not aiperf:
        pytest.skip("no aiperf command (not a project dependency): pip install aiperf==0.13.0 in a venv of "
                    "its own and set AIPERF=/path/to/venv/bin/aiperf")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    run_documented(".venv-aiperf/bin/aiperf profile", default_server, tmp_path, env,
                   replace=(".venv-aiperf/bin/aiperf", aiperf))
    out_dir = tmp_path / "aiperf"
    report = json.loads((out_dir / "profile_export_aiperf.json").read_text())
    assert report["request_count"]["avg"] == 4 and not report["error_summary"], report["error_summary"]
    records = [json.loads(line) for line in (out_dir / "profile_export.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(not r.get("error") for r in records), records


def test_served_model_name_replaces_the_folders_name(tmp_path):
    save_family("llama", tmp_path / "llama")
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", model=str(tmp_path / "llama"),
                       extra_args=("--served-model-name", "acme/tiny-llama", "tiny")) as server:
        assert model_ids(server) == ["acme/tiny-llama"]
        assert httpx.get(server.url + "/healthz").json()["model"] == "acme/tiny-llama"
        for name in ("acme/tiny-llama", "tiny"):
            r = complete(server, name)
            assert r.status_code == 200 and r.json()["model"] == name, r.text
        r = complete(server, "llama")  # the folder's name, served only when no name is given
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_served_model_name_flag_and_its_refusals():
    args = build_parser().parse_args(["serve", "--served-model-name", "a/b", "c"])
    assert args.served_model_name == ["a/b", "c"]
    assert Settings(served_model_name=("a/b", "c")).served_model_name == ("a/b", "c")
    for names in (("a", "a"), ("",), ("a", " ")):
        with pytest.raises(ValueError, match="--served-model-name"):
            Settings(served_model_name=names)
