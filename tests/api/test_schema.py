"""The API against its own OpenAPI schema: schemathesis (a fixed seed, a bounded number of examples per route)
fuzzes the real server process and must find no 5xx and no status code the schema does not document."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.helpers.server_process import ServerSpec
from tests.helpers.support import save_tiny_llama

KEYS = {"admin": "schema-admin", "acme": "schema-acme"}
EXAMPLES = 25  # per route and phase; the whole run takes about a minute on the 2-core CPU
SEED = 1


@pytest.fixture(scope="module")
def server_spec(tmp_path_factory, tokenizer) -> ServerSpec:
    # a tiny model with a short context: generated max_new_tokens are bounded by it, so each request is quick
    model = save_tiny_llama(tmp_path_factory.mktemp("schema-model"), tokenizer, max_positions=256)
    auth = {
        "admin_keys": [KEYS["admin"]],
        "tenants": {"acme": {"api_keys": [KEYS["acme"]], "max_tasks": 2, "max_concurrent_requests": 2}},
    }
    return ServerSpec(model=str(model), auth=auth, extra_args=("--public-docs", "--threads", "1"))


def schemathesis(server, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the schemathesis CLI (in the server's folder, where it keeps its files) against the server."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--seed", str(SEED),
           "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60",
           "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=server.store_dir.parent)


def test_the_schema_documents_each_routes_errors(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()  # --public-docs: no key needed
    assert httpx.get(f"{server.url}/prefixes").status_code == 401  # but the API still is

    def codes(path, method):
        return set(schema["paths"][path][method]["responses"])

    assert {"400", "401", "404", "413", "429", "503"} <= codes("/generate", "post")
    assert {"400", "401", "404", "413", "429", "503"} <= codes("/v1/chat/completions", "post")
    assert {"400", "401", "403", "413", "429"} <= codes("/prefixes/{task}", "post")
    assert {"400", "401", "403", "404", "503"} <= codes("/prefixes/{task}", "delete")
    assert {"401", "403"} <= codes("/metrics", "get")
    unauthorized = schema["paths"]["/v1/completions"]["post"]["responses"]["401"]
    error = unauthorized["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/OpenAIError")


@pytest.mark.parametrize("caller", ["acme", "admin"])
def test_fuzzing_finds_no_server_errors_or_undocumented_statuses(server, caller):
    done = schemathesis(server, "--header", f"Authorization: Bearer {KEYS[caller]}", "--max-examples",
                        str(EXAMPLES))
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]


def test_without_a_key_every_route_answers_as_documented(server):
    done = schemathesis(server, "--max-examples", "3", "--phases", "examples,fuzzing")
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]


def test_a_tiny_top_p_is_not_a_server_error(server):
    """Found by schemathesis (seed 3, 300 examples): top_p below every token's probability once emptied the
    sampling distribution and failed the whole batch; the nucleus always keeps the most likely token."""
    r = httpx.post(f"{server.url}/generate", headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=60,
                   json={"prompt": "hello", "max_new_tokens": 4, "temperature": 1.0, "top_p": 1e-300})
    assert r.status_code < 500, r.text
