"""End-to-end HTTP tests: the real server (uvicorn subprocess), the real default model, real PEFT adapters.

The server is started once for the module (plus one restart, by ``test_restart_*``) on a temporary store;
every request goes over HTTP with httpx. Adapters are made with PEFT 0.21.2 on a model built from the
converted default model's config.json (only adapter tensors are saved, so the base weights don't matter),
their values scaled up so that a task visibly changes greedy output.

Run: PREFIX_SERVE_CACHE=/tmp/pscache .venv/bin/python -m pytest -q tests/api/test_server_http.py
(PREFIX_SERVE_CACHE is optional: without it the default cache is used, converted once on first use.)
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.engine.model import DEFAULT_MODEL_ID, default_model_dir
from tests.helpers.adapters import peft_adapter
from tests.helpers.server_process import ServerProcess, ServerSpec

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MAX_NEW = 12
NUM_VIRTUAL = 8
SCALE = 5.0  # PEFT's N(0, 1) init, scaled up so that a task clearly changes greedy output
CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# (task, prompt) pairs: the two task kinds and the bare model, prompts of different lengths, so that a
# concurrent batch mixes prefix-KV rows, soft-prompt rows and plain rows with different padding.
CASES = [
    (None, PROMPT),
    ("pre", "Write a haiku about the sea:"),
    ("pt", "def fibonacci(n):"),
    (None, "Hello! How are you today? I"),
    ("pre", PROMPT),
    ("pt", PROMPT),
    (None, "Q: What is 2+2?\nA:"),
    ("pre", "Translate to French: cat"),
]
RESPONSE_KEYS = {"task", "text", "token_ids", "finish_reason", "usage"}
RECORD_KEYS = {"task", "kind", "num_virtual_tokens", "sha256", "version", "bytes"}


# ---------------------------------------------------------------------------------------------------------
# Adapters (real PEFT)


def _peft_files(model, peft_config, out_dir: Path) -> dict[str, bytes]:
    _, files = peft_adapter(model, peft_config, out_dir, seed=1234, scale=SCALE)
    return {name: files[name] for name in (CONFIG, WEIGHTS)}


def _embedding(files: dict[str, bytes]) -> torch.Tensor:
    return safetensors.torch.load(files[WEIGHTS])["prompt_embeddings"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    # Converts the embedded GGUF once when the cache (PREFIX_SERVE_CACHE or the default) is empty, before
    # the server starts, so the server only loads the converted copy.
    return default_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Adapter name -> {file name: bytes}: the two served kinds and two made for other architectures."""
    from peft import PrefixTuningConfig, PromptTuningConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    config = AutoConfig.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_config(config)
    out = {
        "prefix": _peft_files(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL),
                              root / "prefix"),
        "prompt": _peft_files(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL),
                              root / "prompt"),
    }
    # Other architectures: only the dimensions PEFT reads matter, so shrink vocab and MLP to build fast.
    fewer_layers = copy.deepcopy(config)
    fewer_layers.num_hidden_layers, fewer_layers.vocab_size, fewer_layers.intermediate_size = 2, 256, 16
    out["fewer_layers"] = _peft_files(
        AutoModelForCausalLM.from_config(fewer_layers),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL), root / "fewer_layers")
    narrow_kv = copy.deepcopy(config)
    narrow_kv.num_key_value_heads, narrow_kv.vocab_size, narrow_kv.intermediate_size = 1, 256, 16
    out["narrow_kv"] = _peft_files(
        AutoModelForCausalLM.from_config(narrow_kv),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL), root / "narrow_kv")

    # The shapes the server must see (else the bad-upload tests would test something else).
    layers, kv_heads, head_dim, hidden = 30, 3, 64, 576
    assert _embedding(out["prefix"]).shape == (NUM_VIRTUAL, layers * 2 * kv_heads * head_dim)
    assert _embedding(out["prompt"]).shape == (NUM_VIRTUAL, hidden)
    assert json.loads(out["fewer_layers"][CONFIG])["num_layers"] == 2
    assert json.loads(out["narrow_kv"][CONFIG])["num_layers"] == layers
    assert _embedding(out["narrow_kv"]).shape == (NUM_VIRTUAL, layers * 2 * 1 * head_dim)
    return out


def _multipart(files: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, data)) for name, data in files.items()]


# ---------------------------------------------------------------------------------------------------------
# The server and a client that follows it across the restart


class Api:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.http = httpx.Client(timeout=180.0)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.http.request(method, self.server.url + path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def delete(self, path: str, **kwargs) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def upload(self, task: str, files: dict[str, bytes]) -> httpx.Response:
        return self.request("POST", f"/prefixes/{task}", files=_multipart(files))

    def generate_raw(self, task: str | None, prompt: str, **params) -> httpx.Response:
        body = {"prompt": prompt, "max_new_tokens": MAX_NEW, **params}
        return self.request("POST", "/generate", params={"task": task} if task is not None else {}, json=body)

    def generate(self, task: str | None, prompt: str, **params) -> dict:
        r = self.generate_raw(task, prompt, **params)
        assert r.status_code == 200, (task, prompt, params, r.status_code, r.text)
        return r.json()

    def records(self) -> dict[str, dict]:
        r = self.get("/prefixes")
        assert r.status_code == 200, r.text
        return {rec["task"]: rec for rec in r.json()["prefixes"]}

    def metrics(self) -> dict[tuple[str, tuple], float]:
        r = self.get("/metrics")
        assert r.status_code == 200, r.text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    def assert_healthy(self) -> None:
        r = self.get("/healthz")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok"


@pytest.fixture(scope="module")
def server_spec(model_dir) -> ServerSpec:
    return ServerSpec(startup_timeout=300)


@pytest.fixture(scope="module")
def api(server) -> Api:
    client = Api(server)
    yield client
    client.http.close()


@pytest.fixture(scope="module")
def uploads(api, adapters) -> dict[str, httpx.Response]:
    """The module's two tasks: 'pre' (PREFIX_TUNING) and 'pt' (PROMPT_TUNING)."""
    return {"pre": api.upload("pre", adapters["prefix"]), "pt": api.upload("pt", adapters["prompt"])}


@pytest.fixture(scope="module")
def refs(api, uploads) -> dict[tuple[str | None, str], list[int]]:
    """Greedy token ids of every case, each request sent alone."""
    for task, r in uploads.items():
        assert r.status_code == 201, (task, r.text)
    out = {}
    for task, prompt in CASES:
        out[(task, prompt)] = api.generate(task, prompt)["token_ids"]
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. Uploading, listing, versions


def test_healthz(api):
    r = api.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == DEFAULT_MODEL_ID


@pytest.mark.parametrize("task,kind,nbytes", [
    ("pre", "prefix_tuning", 30 * 2 * 3 * NUM_VIRTUAL * 64 * 4),  # [L, 2, Hkv, P, D] float32
    ("pt", "prompt_tuning", NUM_VIRTUAL * 576 * 4),  # [P, hidden] float32
])
def test_upload_returns_task_record(uploads, task, kind, nbytes):
    r = uploads[task]
    assert r.status_code == 201, r.text
    rec = r.json()
    assert RECORD_KEYS <= rec.keys()
    assert rec["task"] == task
    assert rec["kind"] == kind
    assert rec["num_virtual_tokens"] == NUM_VIRTUAL
    assert re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])
    assert rec["version"] == 1
    assert rec["bytes"] == nbytes
    assert rec["source_format"] == "peft"


def test_list_and_get_prefixes(api, uploads):
    listed = api.records()
    assert {"pre", "pt"} <= listed.keys()
    for task, r in uploads.items():
        assert listed[task] == r.json()
        got = api.get(f"/prefixes/{task}")
        assert got.status_code == 200
        assert got.json() == r.json()
    assert uploads["pre"].json()["sha256"] != uploads["pt"].json()["sha256"]
    missing = api.get("/prefixes/no-such-task")
    assert missing.status_code == 404
    assert "no-such-task" in missing.json()["detail"]


def test_reupload_same_adapter_gives_version_2(api, adapters, refs):
    before = api.get("/prefixes/pre").json()
    r = api.upload("pre", adapters["prefix"])
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["version"] == before["version"] + 1 == 2
    assert rec["sha256"] == before["sha256"]  # same tensor, same digest
    assert api.get("/prefixes/pre").json() == rec
    assert api.records()["pre"] == rec
    assert api.generate("pre", PROMPT)["token_ids"] == refs[("pre", PROMPT)]


def test_reupload_with_other_adapter_serves_the_new_version(api, adapters, refs):
    # The first version becomes resident by generating with it; the replacement must not be shadowed.
    first = api.upload("swap", adapters["prefix"])
    assert first.status_code == 201, first.text
    assert api.generate("swap", PROMPT)["token_ids"] == refs[("pre", PROMPT)]
    second = api.upload("swap", adapters["prompt"])
    assert second.status_code == 201, second.text
    rec = second.json()
    assert (rec["version"], rec["kind"]) == (2, "prompt_tuning")
    assert rec["sha256"] == api.get("/prefixes/pt").json()["sha256"]
    assert api.generate("swap", PROMPT)["token_ids"] == refs[("pt", PROMPT)]
    assert api.delete("/prefixes/swap").status_code == 204


def test_delete_task(api, adapters, refs):
    assert api.upload("doomed", adapters["prefix"]).status_code == 201
    assert api.generate("doomed", PROMPT)["token_ids"] == refs[("pre", PROMPT)]
    r = api.delete("/prefixes/doomed")
    assert r.status_code == 204
    assert r.content == b""
    gone = api.generate_raw("doomed", PROMPT)
    assert gone.status_code == 404
    assert "doomed" in gone.json()["detail"]
    assert api.get("/prefixes/doomed").status_code == 404
    assert "doomed" not in api.records()
    again = api.delete("/prefixes/doomed")
    assert again.status_code == 404
    assert "doomed" in again.json()["detail"]
    unknown = api.delete("/prefixes/never-existed")
    assert unknown.status_code == 404
    # the other tasks are untouched
    assert {"pre", "pt"} <= api.records().keys()


# ---------------------------------------------------------------------------------------------------------
# 2. /generate


@pytest.mark.parametrize("task", [None, "pre", "pt"])
def test_generate_response(api, refs, tokenizer, task):
    body = api.generate(task, PROMPT)
    assert body.keys() == RESPONSE_KEYS
    assert body["task"] == task
    assert body["token_ids"] == refs[(task, PROMPT)]  # greedy: the same request gives the same tokens
    if body["finish_reason"] == "length":
        assert len(body["token_ids"]) == MAX_NEW
    else:  # the end-of-sequence token ended it early, and is reported
        assert body["finish_reason"] == "stop"
        assert 0 < len(body["token_ids"]) < MAX_NEW
        assert body["token_ids"][-1] == tokenizer.eos_token_id
    assert body["usage"] == {"prompt_tokens": len(tokenizer(PROMPT)["input_ids"]),
                             "completion_tokens": len(body["token_ids"])}
    assert body["text"] == tokenizer.decode(body["token_ids"], skip_special_tokens=True)
    assert body["text"].strip()


def test_base_model_output_is_sensible(refs, tokenizer):
    # The real SmolLM2-135M-Instruct, greedy, knows this one.
    assert "Paris" in tokenizer.decode(refs[(None, PROMPT)])


def test_tasks_change_the_output(refs):
    base, pre, pt = (refs[(t, PROMPT)] for t in (None, "pre", "pt"))
    assert pre != base
    assert pt != base
    assert pre != pt


# ---------------------------------------------------------------------------------------------------------
# 3. Concurrency: a mixed continuous batch gives each request what it gets alone


def test_concurrent_mixed_requests_match_solo(api, refs):
    before = api.metrics()

    async def fire() -> list[dict]:
        async with httpx.AsyncClient(base_url=api.server.url, timeout=180.0) as client:
            async def one(task, prompt):
                r = await client.post("/generate", params={"task": task} if task else {},
                                      json={"prompt": prompt, "max_new_tokens": MAX_NEW})
                assert r.status_code == 200, r.text
                return r.json()

            return await asyncio.gather(*(one(t, p) for t, p in CASES))

    results = asyncio.run(fire())
    for (task, prompt), body in zip(CASES, results):
        assert body["task"] == task
        assert body["token_ids"] == refs[(task, prompt)], (task, prompt)

    # And they really were batched: some decode step ran with more than one row.
    after = api.metrics()
    steps = after[("prefix_serve_batch_size_count", ())] - before[("prefix_serve_batch_size_count", ())]
    single = (after[("prefix_serve_batch_size_bucket", (("le", "1.0"),))]
              - before[("prefix_serve_batch_size_bucket", (("le", "1.0"),))])
    assert steps > single, "no decode step had more than one request in the batch"


# ---------------------------------------------------------------------------------------------------------
# 6. Sampling and stop strings


def test_seeded_sampling_is_reproducible(api, refs):
    params = {"temperature": 0.8, "seed": 123}
    first = api.generate(None, PROMPT, **params)["token_ids"]
    second = api.generate(None, PROMPT, **params)["token_ids"]
    other_seed = api.generate(None, PROMPT, temperature=0.8, seed=124)["token_ids"]
    assert first == second
    assert first != refs[(None, PROMPT)]  # it really sampled
    assert other_seed != first  # and the seed matters


def test_stop_string(api, tokenizer):
    body = api.generate(None, PROMPT, stop=["."])
    assert body["finish_reason"] == "stop"
    assert "." not in body["text"]
    assert body["text"]
    assert len(body["token_ids"]) < MAX_NEW
    assert body["usage"]["completion_tokens"] == len(body["token_ids"])
    # The text is the generation up to (not including) the first stop string.
    full = tokenizer.decode(body["token_ids"], skip_special_tokens=True)
    assert full.index(".") == len(body["text"])
    assert full.startswith(body["text"])


def test_stop_string_at_start_of_output(api, refs, tokenizer):
    first_piece = tokenizer.decode(refs[(None, PROMPT)][:1], skip_special_tokens=True)  # ' Paris'
    assert first_piece.strip()
    body = api.generate(None, PROMPT, stop=[first_piece])
    assert body["finish_reason"] == "stop"
    assert body["token_ids"] == refs[(None, PROMPT)][:1]
    assert body["text"] == ""


# ---------------------------------------------------------------------------------------------------------
# 5a. Request errors


def test_unknown_task_is_404(api):
    r = api.generate_raw("no-such-task", PROMPT)
    assert r.status_code == 404
    assert "no-such-task" in r.json()["detail"]


def test_invalid_task_name_in_generate_is_a_client_error(api):
    r = api.generate_raw("bad name!", PROMPT)
    assert r.status_code in (400, 404, 422), r.text
    assert "bad name!" in r.json()["detail"]


def test_invalid_task_name_in_generate_is_400(api):
    r = api.generate_raw("bad name!", PROMPT)
    assert r.status_code == 400, r.text
    assert "invalid" in r.json()["detail"].lower()


@pytest.mark.parametrize("task,virtual", [(None, 0), ("pre", NUM_VIRTUAL), ("pt", NUM_VIRTUAL)])
def test_context_limit(api, uploads, tokenizer, task, virtual):
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    one_too_many = CONTEXT - n_prompt - virtual + 1  # the task's virtual tokens count against the context
    r = api.generate_raw(task, PROMPT, max_new_tokens=one_too_many)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert str(CONTEXT) in detail
    assert str(CONTEXT + 1) in detail
    assert "max_new_tokens" in detail


@pytest.mark.parametrize("params,field", [
    ({"top_p": 0}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": [""]}, "stop"),
    ({"max_tokens": 5}, "max_tokens"),  # misspelt parameter: refused, not ignored
])
def test_bad_sampling_params_are_422(api, params, field):
    r = api.generate_raw(None, PROMPT, **params)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(field in map(str, err["loc"]) for err in detail), detail


# ---------------------------------------------------------------------------------------------------------
# 5b. Bad uploads: refused with a helpful message, nothing stored, the server unharmed


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, 'w'), i.e. creates a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _malicious_bin(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(NUM_VIRTUAL, 4), "x": _CreatesFile(marker)}, buf)
    return buf.getvalue()


def _with_nan(files: dict[str, bytes]) -> dict[str, bytes]:
    tensors = safetensors.torch.load(files[WEIGHTS])
    tensors["prompt_embeddings"][3, 17] = float("nan")
    return {CONFIG: files[CONFIG], WEIGHTS: safetensors.torch.save(tensors)}


BAD_UPLOADS = {
    # name: (files factory(adapters), expected status, substrings of detail (lowercase))
    "wrong_layer_count": (lambda a: a["fewer_layers"], 400, ["num_layers=2", "30 layers"]),
    "wrong_kv_width": (lambda a: a["narrow_kv"], 400, ["width 3840", "11520"]),
    "nan_values": (lambda a: _with_nan(a["prefix"]), 400, ["nan"]),
    "broken_json": (lambda a: {CONFIG: a["prefix"][CONFIG][:-7] + b'{,"', WEIGHTS: a["prefix"][WEIGHTS]}, 400,
                    ["adapter_config.json", "not valid json"]),
    "missing_weights": (lambda a: {CONFIG: a["prefix"][CONFIG]}, 400, ["without weights", WEIGHTS]),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
@pytest.mark.parametrize("task", ["pre", "fresh-task"])
def test_bad_upload_is_refused(api, uploads, adapters, case, task):
    make, status, needles = BAD_UPLOADS[case]
    before = api.records()
    r = api.upload(task, make(adapters))
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for needle in needles:
        assert needle.lower() in detail.lower(), detail
    api.assert_healthy()
    assert api.records() == before  # an existing task keeps its version; a new name is not created


def test_malicious_pickle_is_never_executed(api, uploads, adapters, tmp_path):
    # The payload is live: unpickling it without weights_only really creates its marker file.
    control = tmp_path / "control-marker"
    torch.load(io.BytesIO(_malicious_bin(control)), weights_only=False)
    assert control.exists()

    before = api.records()
    for task in ("pre", "evil"):
        marker = tmp_path / f"pwned-{task}"
        files = {CONFIG: adapters["prefix"][CONFIG], "adapter_model.bin": _malicious_bin(marker)}
        r = api.upload(task, files)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert "adapter_model.bin" in detail
        assert "refused" in detail and "weights_only" in detail
        assert not marker.exists()
        api.assert_healthy()
    assert api.records() == before


def test_upload_without_files_field_is_422(api, uploads):
    before = api.records()
    for kwargs in ({}, {"data": {"other": "x"}}, {"files": [("other", ("adapter_config.json", b"{}"))]}):
        r = api.request("POST", "/prefixes/pre", **kwargs)
        assert r.status_code == 422, (kwargs, r.text)
        detail = r.json()["detail"]
        assert any("files" in map(str, err["loc"]) for err in detail), detail
    api.assert_healthy()
    assert api.records() == before


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_invalid_task_name_on_prefixes(api, adapters, method):
    kwargs = {"files": _multipart(adapters["prefix"])} if method == "POST" else {}
    r = api.request(method, "/prefixes/bad name!", **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert "invalid" in r.json()["detail"].lower()
    api.assert_healthy()
    assert not any(" " in t for t in api.records())


def test_tasks_still_serve_after_bad_requests(api, refs):
    api.assert_healthy()
    for task in (None, "pre", "pt"):
        assert api.generate(task, PROMPT)["token_ids"] == refs[(task, PROMPT)]


# ---------------------------------------------------------------------------------------------------------
# Client disconnect (own short-lived server: with the bug, the orphaned generation would run for minutes)


def test_client_disconnect_cancels_generation(model_dir, tmp_path):
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", startup_timeout=300,
                       stop_timeout=5) as srv:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(srv.url + "/generate", timeout=httpx.Timeout(60.0, read=2.0),
                       json={"prompt": PROMPT, "max_new_tokens": 8000, "ignore_eos": True})
        cancelled = 'prefix_serve_requests_total{outcome="cancelled",tenant="default"} 1.0'
        running, counted = None, False
        for _ in range(40):  # the disconnect is noticed within a poll interval; allow for a slow machine
            running = httpx.get(srv.url + "/healthz").json()["running"]
            counted = cancelled in httpx.get(srv.url + "/metrics").text
            if running == 0 and counted:
                break
            time.sleep(0.25)
        assert running == 0, "the abandoned generation is still running"
        assert counted, "the abandoned generation was not counted as cancelled"


# ---------------------------------------------------------------------------------------------------------
# 4. Restart on the same store


@pytest.mark.long  # the server stopped and started again: minutes (make test-long)
def test_restart_preserves_tasks_and_outputs(api, server, refs):
    before = api.records()
    assert {"pre", "pt"} <= before.keys()
    shutdowns = server.log_text().count("Application shutdown complete")
    code = server.stop()
    server.start()
    # uvicorn shuts down gracefully on SIGTERM (lifespan exit: engine stopped), then re-raises the signal
    assert code in (0, -signal.SIGTERM), code
    assert server.log_text().count("Application shutdown complete") == shutdowns + 1
    api.assert_healthy()
    after = api.records()
    assert after == before  # same tasks, versions, sha256, sizes, creation times
    for task in ("pre", "pt"):
        assert api.get(f"/prefixes/{task}").json() == before[task]
    for task, prompt in [(None, PROMPT), ("pre", PROMPT), ("pt", PROMPT), ("pre", CASES[1][1])]:
        assert api.generate(task, prompt)["token_ids"] == refs[(task, prompt)], (task, prompt)


# ---------------------------------------------------------------------------------------------------------
# 7. Metrics


def test_metrics_count_traffic(api, refs):
    before = api.metrics()
    body = api.generate("pt", PROMPT, max_new_tokens=5)
    after = api.metrics()

    def delta(name, labels=()):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0.0) - before.get(key, 0.0)

    tenant = (("tenant", "default"),)
    outcome = (("outcome", body["finish_reason"]), *tenant)
    assert delta("prefix_serve_requests_total", outcome) == 1
    assert delta("prefix_serve_generation_tokens_total", tenant) == body["usage"]["completion_tokens"] == 5
    assert delta("prefix_serve_prompt_tokens_total", tenant) == body["usage"]["prompt_tokens"]
    assert after[("prefix_serve_requests_total", outcome)] > 0
    assert after[("prefix_serve_generation_tokens_total", tenant)] > 0

    text = api.get("/metrics").text
    assert "# TYPE prefix_serve_requests_total counter" in text
    assert re.search(r'^prefix_serve_generation_tokens_total\{tenant="default"\} [1-9]', text, re.MULTILINE)


def test_server_log_has_no_tracebacks(server):
    log = server.log_text()
    assert "Application startup complete" in log
    assert "Traceback" not in log, log[-4000:]
