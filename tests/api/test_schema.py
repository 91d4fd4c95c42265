"""The API against its own OpenAPI schema: schemathesis (a fixed seed, a bounded number of examples per route)
fuzzes the real server process with every check it has (``--checks all``: no 5xx, documented statuses,
headers and content types, schema-valid requests accepted, schema-violating ones refused, 405 with the
right ``Allow``), on a server with ``--auth-file`` (as a tenant, as an admin, without a key) and on one
without. The few refusals no JSON Schema can state are listed in tests/api/schemathesis_hooks.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from server.api.schemas import below
from tests.helpers.server_process import REPO_ROOT, ServerProcess, ServerSpec
from tests.helpers.support import save_tiny_llama

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

KEYS = {"admin": "schema-admin", "acme": "schema-acme"}
EXAMPLES = 25  # per route and phase; each run takes about 20 s on the 2-core CPU
SEED = 1
TINY_CONTEXT = 256  # generated max_new_tokens are bounded by it, so each request is quick


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("schema-model"), tokenizer, max_positions=TINY_CONTEXT)


@pytest.fixture(scope="module")
def server_spec(tiny_model) -> ServerSpec:
    auth = {
        "admin_keys": [KEYS["admin"]],
        "tenants": {"acme": {"api_keys": [KEYS["acme"]], "max_tasks": 2, "max_concurrent_requests": 2}},
    }
    return ServerSpec(model=str(tiny_model), auth=auth, extra_args=("--public-docs", "--threads", "1"))


@pytest.fixture(scope="module")
def open_server(tiny_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """The same model served without --auth-file (single-user mode)."""
    root = tmp_path_factory.mktemp("schema-open")
    with ServerProcess(root / "store", root / "server.log", model=str(tiny_model),
                       extra_args=("--threads", "1")) as proc:
        yield proc


def schemathesis(server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the schemathesis CLI with every check (in the server's folder, where it keeps its files).
    Its positive-data check is replaced by tests/api/schemathesis_hooks.py's, which knows the refusals
    JSON Schema cannot state."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--seed", str(SEED),
           "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=server.store_dir.parent)


def test_the_schema_documents_each_routes_errors(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()  # --public-docs: no key needed
    assert httpx.get(f"{server.url}/prefixes").status_code == 401  # but the API still is

    def codes(path, method):
        return set(schema["paths"][path][method]["responses"])

    assert {"400", "401", "404", "413", "429", "503"} <= codes("/generate", "post")
    assert {"400", "401", "404", "413", "429", "503"} <= codes("/v1/chat/completions", "post")
    assert {"400", "401", "403", "404", "413", "429", "507"} <= codes("/prefixes/{task}", "post")
    assert {"400", "401", "403", "404", "503"} <= codes("/prefixes/{task}", "delete")
    assert {"401", "403"} <= codes("/metrics", "get")
    unauthorized = schema["paths"]["/v1/completions"]["post"]["responses"]["401"]
    error = unauthorized["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/OpenAIErrorResponse")
    # /metrics answers text, its refusals JSON
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["403"]["content"]) == {"application/json"}
    assert "text/event-stream" in schema["paths"]["/generate"]["post"]["responses"]["200"]["content"]


def test_the_schema_states_the_served_models_bounds(server):
    """Names, token ids and tokens to generate are bounded in the schema as the routes bound them."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    parts = schema["components"]["schemas"]
    task = next(p for p in schema["paths"]["/prefixes/{task}"]["get"]["parameters"] if p["name"] == "task")
    assert re.fullmatch(task["schema"]["pattern"].strip("^$"), "my-task.v2")
    assert not re.fullmatch(task["schema"]["pattern"].strip("^$"), "-x")
    tokenizer_info = httpx.get(f"{server.url}/tokenizer_info",
                               headers={"Authorization": f"Bearer {KEYS['acme']}"}).json()
    assert parts["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == \
        tokenizer_info["vocab_size"] - 1
    assert parts["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] == TINY_CONTEXT - 1
    keys = parts["CompletionRequest"]["properties"]["logit_bias"]["propertyNames"]["pattern"]
    assert re.fullmatch(keys, "0") and not re.fullmatch(keys, "007")


@pytest.mark.parametrize("n", [1, 2, 10, 11, 57, 100, 1000, 49152])
def test_token_id_keys_pattern_matches_exactly_the_vocabulary(n):
    pattern = re.compile(below(n))
    assert [i for i in range(n + 150) if pattern.fullmatch(str(i))] == list(range(n))
    assert not any(pattern.fullmatch(s) for s in ("", "00", "01", "+1", "-0", " 1", "1 "))


@pytest.mark.parametrize("caller", ["acme", "admin"])
def test_fuzzing_with_a_key_finds_nothing(server, caller):
    done = schemathesis(server, "--header", f"Authorization: Bearer {KEYS[caller]}", "--max-examples",
                        str(EXAMPLES))
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]


def test_fuzzing_without_a_key_finds_nothing(server):
    """Every route answers as documented: 401 (or 405 for a method the path does not have)."""
    done = schemathesis(server, "--max-examples", "3", "--phases", "examples,fuzzing")
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]


def test_fuzzing_a_server_without_auth_finds_nothing(open_server):
    done = schemathesis(open_server, "--max-examples", str(EXAMPLES))
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]


def test_a_path_answers_405_with_all_its_methods_before_asking_for_a_key(server):
    """Starlette's own 405 named the first route's methods only (POST for /prefixes/{task})."""
    r = httpx.request("OPTIONS", f"{server.url}/prefixes/t1")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, POST", r.text
    r = httpx.request("TRACE", f"{server.url}/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["detail"]
    assert httpx.get(f"{server.url}/generate").status_code == 405
    assert httpx.post(f"{server.url}/generate", json={"prompt": "x"}).status_code == 401


def test_a_tiny_top_p_is_not_a_server_error(server):
    """Found by schemathesis (seed 3, 300 examples): top_p below every token's probability once emptied the
    sampling distribution and failed the whole batch; the nucleus always keeps the most likely token."""
    r = httpx.post(f"{server.url}/generate", headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=60,
                   json={"prompt": "hello", "max_new_tokens": 4, "temperature": 1.0, "top_p": 1e-300})
    assert r.status_code < 500, r.text


def test_integers_past_64_bits_are_refused_not_a_server_error(server):
    """Found by schemathesis (seed 2): a top_k of 8.6e27 passed validation and broke the engine message."""
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    for body in ({"prompt": "hi", "top_k": 8595868611850287647243108352},
                 {"prompt": "hi", "seed": 2**64}):
        r = httpx.post(f"{server.url}/generate", headers=headers, json=body, timeout=60)
        assert r.status_code == 422, r.text
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                   json={"model": "model", "prompt": "hi", "max_tokens": 2, "min_tokens": 2**70})
    assert r.status_code in (400, 422), r.text


def test_bodies_are_as_strict_as_the_schema(server):
    """A string is not a number and 1 is not true (pydantic's lax mode took both); 7.0 is an integer."""
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    url = f"{server.url}/detokenize"
    assert httpx.post(url, headers=headers, json={"tokens": ["5"]}).status_code == 422
    assert httpx.post(url, headers=headers, json={"tokens": [5.0]}).status_code == 200
    r = httpx.post(f"{server.url}/generate", headers=headers, json={"prompt": "hi", "stream": 1})
    assert r.status_code == 422, r.text
