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
# $refs that only lead to each other: no schema is ever reached (llguidance refuses it)
ALIAS_CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}


def ref_chain(links: int, cycle: bool = False) -> dict:
    """``links`` $defs, each an object whose one property refers to the next (the last back to the first
    with ``cycle``): flat JSON (6 levels), nested ``3 x links`` deep once the $refs are followed. 1,000 of
    them (57 KB) segfaulted llguidance within the byte and depth caps, before depth counted through $ref."""
    defs: dict = {f"a{i}": {"properties": {"x": {"$ref": f"#/$defs/a{i + 1}"}}} for i in range(links)}
    defs[f"a{links}"] = {"$ref": "#/$defs/a0"} if cycle else {}
    return {"type": "object", "$defs": defs, "properties": {"x": {"$ref": "#/$defs/a0"}}}


def tool(parameters: dict, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def chat(url: str, model: str, tools: list, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "tools": tools,
            "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


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


@pytest.mark.parametrize("extra", [
    {"guided_json": ref_chain(1000)},
    {"guided_json": ref_chain(1000, cycle=True)},
], ids=["ref-chain", "ref-cycle-1000"])
def test_schemas_nested_through_ref_are_400s_naming_the_depth_limit(served, extra):
    url, model = served
    response = complete(url, model, **extra)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "deeper than 64 levels" in message and "limit on schema depth, counted through $ref" in message
    assert_serving(url, model)


def test_a_recursive_ref_cycle_is_served_and_one_that_reaches_no_schema_is_a_400(served):
    """A cycle through an optional property is a recursive schema (a tree), which the compiler follows
    lazily: it is served, as a tool's parameters too. One of $refs alone never reaches a schema: it compiles,
    but allows no output, which the check finds in its first token mask: a 400 (it was a 500 from the engine,
    once the request had started)."""
    url, model = served
    response = complete(url, model, guided_json=REF_CYCLE)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].startswith("{")
    called = chat(url, model, [tool(REF_CYCLE | {"type": "object"})], tool_choice="required")
    assert called.status_code == 200, called.text
    refused = complete(url, model, guided_json=ALIAS_CYCLE)
    assert refused.status_code == 400 and "allows no output" in refused.text, refused.text
    refused = chat(url, model, [tool(ALIAS_CYCLE)])
    assert refused.status_code == 400 and "allows no output" in refused.text, refused.text
    assert refused.json()["error"]["param"] == "tools.0.function.parameters", refused.text
    assert_serving(url, model)


@pytest.mark.parametrize(("parameters", "limit"), [
    (deep_schema(100), "deeper than 64 levels"),
    (ref_chain(1000), "counted through $ref"),
    (ref_chain(1000, cycle=True), "counted through $ref"),
    ({"type": "object", "properties": {"x": {"enum": list(range(5000))}}}, "over the limit of 1000"),
], ids=["deep", "ref-chain", "ref-cycle-1000", "huge-enum"])
def test_pathological_tool_schemas_are_400s_naming_the_limit(served, parameters, limit):
    url, model = served
    response = chat(url, model, [tool({"type": "object"}, "ok"), tool(parameters)])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert limit in error["message"] and "limit" in error["message"], error
    assert error["param"] == "tools.1.function.parameters", error
    assert_serving(url, model)


def test_too_many_tools_are_refused_before_the_prompt_is_rendered(served):
    url, model = served
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
             for i in range(1000)]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400 and "128" in response.text, response.text


def test_a_tool_prompt_over_the_token_cap_is_refused_before_the_conversation_is_rendered(served):
    """100 tools pass the count (128) and byte caps, but their listing is ~4,900 tokens of the default
    model's 8,192-token context: over --max-tool-prompt-tokens' default, half of it."""
    url, model = served
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}
    response = chat(url, model, [tool(schema, f"f{i}") for i in range(100)])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "over the limit of 4096" in error["message"] and "--max-tool-prompt-tokens" in error["message"]
    assert error["param"] == "tools", error
    shown_none = chat(url, model, [tool(schema, f"f{i}") for i in range(100)], tool_choice="none")
    assert shown_none.status_code == 200, shown_none.text  # tools not shown take no prompt


@pytest.mark.long  # a server of its own whose checker is crashed twice: minutes (make test-long)
def test_a_grammar_that_crashes_the_grammar_library_costs_only_its_request(tmp_path):
    """With the limits raised, the 5,000-rule chain and a tool whose parameters chain 1,000 $refs reach
    llguidance and crash the checker process: each request is a 400 saying so, a stream running beside them
    is served to its end, and a new checker takes the next grammar. (Tool schemas were compiled in the HTTP
    process before: that tool took the whole server down.)"""
    limits = "bytes=10000000,rules=1000000,nesting=1000000"
    env = {**os.environ, "PREFIX_SERVE_GRAMMAR_LIMITS": limits}
    # the tool-prompt cap raised too: it is checked before any schema is compiled, and would refuse the tool
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", env=env,
                       extra_args=("--max-tool-prompt-tokens", "1000000")) as server:
        url = server.url
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"model": model, "prompt": "Count:", "max_tokens": 120, "temperature": 0,
                                "stream": True, "ignore_eos": True}) as running:
            lines = running.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]  # it is running
            crashed = complete(url, model, guided_grammar=chain(5000))
            tool_crashed = chat(url, model, [tool(ref_chain(1000))])
            events += [line for line in lines if line.startswith("data: ")]
        assert crashed.status_code == 400, crashed.text
        assert "crashed the grammar library" in crashed.json()["error"]["message"]
        assert tool_crashed.status_code == 400, tool_crashed.text
        error = tool_crashed.json()["error"]
        assert "crashed the grammar library" in error["message"], error
        assert error["param"] == "tools.0.function.parameters", error
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)  # unharmed
        assert server.running
        assert_serving(url, model)
        assert chat(url, model, [tool(ref_chain(20))], tool_choice="required").status_code == 200
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
