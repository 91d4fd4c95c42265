"""Structured outputs cannot take the server down: grammars past a limit are 400s naming it, and a grammar
that crashes the grammar library costs its own request only (it is checked in a child process)."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.slow


def chain(rules: int) -> str:
    """The issue's crasher: ``r{i}: "t{i}" r{i+1} | "e"`` chained ``rules`` deep (5,000: about 130 KB)."""
    body = "".join(f'r{i}: "t{i}" r{i + 1} | "e"\n' for i in range(rules))
    return f"start: r0\n{body}r{rules}: \"z\"\n"


def nested_alternation(depth: int) -> str:
    return "start: " + '("a" | ' * depth + '"b"' + ")" * depth + "\n"


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


REF_CYCLE = {"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}},
                       "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}},
             "$ref": "#/$defs/a"}


def complete(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "Say something:", "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def assert_serving(url: str, model: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    assert complete(url, model).status_code == 200
    choice = complete(url, model, guided_choice=["yes", "no"])
    assert choice.status_code == 200 and choice.json()["choices"][0]["text"] in ("yes", "no")


@pytest.fixture(scope="module")
def served(server) -> tuple[str, str]:
    url = server.url
    return url, httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize(("extra", "limit"), [
    ({"guided_grammar": chain(5000)}, "bytes"),
    ({"guided_grammar": chain(50_000)}, "bytes"),
    ({"guided_grammar": chain(1500)}, "rules"),
    ({"guided_grammar": nested_alternation(5000)}, "nests"),
    ({"guided_regex": "(" * 500 + "a" + ")" * 500}, "nests"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "deep", "schema": deep_schema(100)}}}, "deeper"),
    ({"guided_json": {"enum": list(range(5000))}}, "enum"),
    ({"guided_choice": [f"c{i}" for i in range(5000)]}, "entries"),
], ids=["5000-rule-chain", "50000-rule-chain", "1500-rules", "nested-alternation", "nested-regex",
        "deep-schema", "huge-enum", "huge-choice"])
def test_grammars_over_a_limit_are_400s_naming_it(served, extra, limit):
    url, model = served
    response = complete(url, model, **extra)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert limit in message and "limit" in message, message
    assert_serving(url, model)


def test_a_ref_cycle_is_answered_and_the_server_stays_up(served):
    url, model = served
    response = complete(url, model, guided_json=REF_CYCLE)
    assert response.status_code in (200, 400), response.text
    assert_serving(url, model)


def test_too_many_tools_are_refused_before_the_prompt_is_rendered(served):
    url, model = served
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
             for i in range(1000)]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400 and "128" in response.text, response.text


def test_a_grammar_that_crashes_the_grammar_library_costs_only_its_request(tmp_path):
    """With the limits raised, the 5,000-rule chain reaches llguidance and crashes the checker process: that
    request is a 400 saying so, every other request is served, and a new checker takes the next grammar."""
    env = {**os.environ, "PREFIX_SERVE_GRAMMAR_LIMITS": "bytes=10000000,rules=1000000"}
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", env=env) as server:
        url = server.url
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"model": model, "prompt": "Count:", "max_tokens": 40, "temperature": 0,
                                "stream": True, "ignore_eos": True}) as running:
            crashed = complete(url, model, guided_grammar=chain(5000))
            events = [line for line in running.iter_lines() if line.startswith("data: ")]
        assert crashed.status_code == 400, crashed.text
        assert "crashed the grammar library" in crashed.json()["error"]["message"]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)  # unharmed
        assert server.running
        assert_serving(url, model)
        assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_a_request_over_the_prompt_token_cap_is_refused_before_anything_runs(served):
    """The issue's 1 MB request (64 prompts of 8,000 token ids) ran 127 s and held everyone else up."""
    url, model = served
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/completions", timeout=120,
                          json={"model": model, "prompt": [[1] * 8000] * 64, "max_tokens": 1})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "512000 prompt tokens" in message and "--max-request-tokens" in message, message
    assert time.monotonic() - started < 60  # a liveness bound: nothing was computed
    assert_serving(url, model)
