"""Every supported family served the way users serve a model: ``save_pretrained`` into a folder, then
``prefix-serve serve --model DIR`` as a real process, spoken to over HTTP.

The in-process matrix (tests/engine/test_engine_oracle.py) builds each family from its config and never loads
one from a folder, which is how a Gemma 2 folder came to be refused at start-up (``load_base_model`` asked
transformers for SDPA attention, which Gemma 2's class refuses). Here each family's tiny random model and a
byte-level tokenizer (tests/helpers/model_folders.py) are saved, served, and asked for greedy tokens, which
must be the in-process model's own greedy choices (its full-recompute argmax).

Each fresh server's first requests are ``json_schema`` ones (one row, then several), after its log showed
the structured-output warm-up done in both processes that need it before start-up completed: the engine's
(server/engine/grammar.py ``Grammars.warm_up``) and the grammar checker's. That the warm-up leaves nothing
for the first request to build or compile is tests/engine/test_grammar_warmup.py's part.

One server per family; servers start a few at a time ahead of the test that uses them (the start-up, mostly
imports in three processes, dominates the module's time: ~10 s of CPU each). The same folders are also loaded
in process (``load_base_model``, as the engine process loads them) and served by an in-process Engine, the
quick check of every family that the suite's fast selection keeps (``-m "not families"``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from server.engine.engine import Engine, EngineConfig
from server.engine.model import SUPPORTED_MODEL_TYPES, attention_implementation, load_base_model
from server.engine.sequence import SamplingParams, Sequence
from tests.engine.test_engine_oracle import run_staggered
from tests.helpers.model_folders import byte_tokenizer, save_family
from tests.helpers.placement import DEVICE, DTYPE
from tests.helpers.server_process import ServerProcess
from tests.helpers.support import assert_oracle_tokens

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

FAMILIES = sorted(SUPPORTED_MODEL_TYPES)
PROMPT = "The quick brown fox jumps"
NEW_TOKENS = 6
AHEAD = 2  # servers starting while a test runs
KV_CACHE_BYTES = 16 << 20  # plenty for a tiny model (the default, 2 GiB, would be allocated by each server)
WARM_UPS = ("engine INFO structured outputs warmed up in", "grammar checker ready in")
STARTED = "Application startup complete"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


class Launcher:
    """Saves each family's folder and starts its server on a worker thread, ``AHEAD`` families before the
    test that needs it; a test takes its server, and stops it when done."""

    def __init__(self, families: list[str], root):
        self.families = families
        self.root = root
        self.pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="family-server")
        self.started: dict[str, Future] = {}

    def _start(self, family: str):
        folder = self.root / family
        model = save_family(family, folder)
        placement = ("--device", str(DEVICE), "--dtype", str(DTYPE).removeprefix("torch."),
                     "--kv-cache-bytes", str(KV_CACHE_BYTES))
        server = ServerProcess(self.root / f"{family}-store", self.root / f"{family}.log", model=str(folder),
                               extra_args=placement, startup_timeout=300)
        return model, server.start()

    def take(self, family: str):
        index = self.families.index(family)
        for ahead in self.families[index:index + AHEAD + 1]:
            if ahead not in self.started:
                self.started[ahead] = self.pool.submit(self._start, ahead)
        return self.started[family].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for future in self.started.values():
            if future.done() and future.exception() is None:
                future.result()[1].stop()


@pytest.fixture(scope="module")
def launcher(request, tmp_path_factory):
    # the module's family-parametrised tests (other parametrised tests in it have no "family")
    families = [item.callspec.params["family"] for item in request.session.items
                if item.module is request.module and "family" in getattr(getattr(item, "callspec", None),
                                                                         "params", {})]
    launcher = Launcher(families, tmp_path_factory.mktemp("families"))
    yield launcher
    launcher.close()


def warm_ups_before_start_up_completed(log: str) -> list[int]:
    """How often each of ``WARM_UPS`` was logged before the server reported its start-up complete."""
    before, started, _ = log.partition(STARTED)
    assert started, "the server never completed its start-up"
    return [before.count(line) for line in WARM_UPS]


def json_schema_chat(server: ServerProcess, family: str, n: int) -> list[str]:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": family, "messages": [{"role": "user", "content": "a person"}], "max_tokens": 4, "n": n,
        "temperature": 0, "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "person", "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    return [choice["message"]["content"] for choice in r.json()["choices"]]


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_loads_from_a_saved_folder(arch, tmp_path):
    """``load_base_model`` on the folder, then an Engine's greedy tokens against the model that was saved."""
    model = save_family(arch, tmp_path / arch)
    assert attention_implementation(model.config) == ("eager" if arch == "gemma2" else "sdpa")
    base = load_base_model(str(tmp_path / arch), DTYPE, str(DEVICE))
    assert (base.model_id, base.shape.model_type, base.eos_token_ids) == (arch, model.config.model_type,
                                                                          frozenset({2}))
    prompt_ids = byte_tokenizer()(PROMPT)["input_ids"]
    assert base.tokenizer(PROMPT)["input_ids"] == prompt_ids
    seqs = [Sequence(prompt_ids[:n], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            for n in (len(prompt_ids), 3)]
    run_staggered(Engine(base, EngineConfig(max_batch_size=2, kv_cache_bytes=KV_CACHE_BYTES)), seqs, [0, 1])
    for seq in seqs:
        assert_oracle_tokens(model, seq.prompt_ids, seq.output_ids, f"{arch} loaded from a folder")


@pytest.mark.families
@pytest.mark.parametrize("family", FAMILIES)
def test_family_served_from_a_saved_folder(family, launcher):
    model, server = launcher.take(family)
    try:
        models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
        assert models[0]["id"] == family  # a folder is served under its name

        # The first requests are structured ones, the warm-up having run in both processes before them.
        assert warm_ups_before_start_up_completed(server.log_text()) == [1, 1], server.log_tail()
        for n in (1, 3):
            for content in json_schema_chat(server, family, n):
                assert content.startswith('{"'), content  # compact JSON, as the schema's grammar allows

        r = httpx.post(server.url + "/generate", timeout=120,
                       json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        prompt_ids = byte_tokenizer()(PROMPT)["input_ids"]
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
        assert len(body["token_ids"]) == NEW_TOKENS
        assert_oracle_tokens(model, prompt_ids, body["token_ids"], f"{family} served from a folder")
    finally:
        server.stop()
    assert "Traceback" not in server.log_text(), server.log_tail()
