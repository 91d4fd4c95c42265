"""Tool calling's parts without a server (server/api/tools.py): the grammar against the real tokenizer, the
call parser whole and streamed, the checks on tool definitions, the conversation's rendering. The same
features through the real server and clients are in tests/api/test_openai_api.py."""

from __future__ import annotations

import asyncio
import json

import llguidance
import pytest

from server.api.tool_calls import CallParser
from server.api.tools import (
    ToolError,
    chat_messages,
    check_schemas,
    grammar,
    parse_choice,
    parse_tools,
    template_renders_tools,
)
from server.engine.grammar import PARSER_LIMITS, Grammars, InvalidGrammar, grammar_source

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = parse_tools([WEATHER, ADD])
PARIS = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>'
SUM = '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def _accepts(grammars: Grammars, tokenizer, choice, text: str) -> bool:
    """Whether the choice's grammar lets the model write ``text`` and then stop."""
    matcher = grammars.matcher(("grammar", grammar(choice)))
    ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return ok and matcher.is_accepting()


@pytest.mark.parametrize("tool_choice, parallel, text, accepted", [
    ("required", False, PARIS, True),
    ("required", False, SUM, True),
    ("required", False, PARIS + "\n" + SUM, False),  # one call only
    ("required", None, PARIS + "\n" + SUM, True),
    ("required", None, "Paris is sunny.", False),
    # a string
    ("required", None, '<tool_call>{"name":"add","arguments":{"a":"1","b":2}}</tool_call>', False),
    ("required", None, '<tool_call>{"name":"nope","arguments":{}}</tool_call>', False),
    # spaces
    ("required", None, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', False),
    ({"type": "function", "function": {"name": "add"}}, None, SUM, True),
    ({"type": "function", "function": {"name": "add"}}, None, PARIS, False),
    ("auto", None, "Paris is sunny.", True),
    ("auto", None, SUM, True),
    ("auto", None, "<b>sunny</b>", False),  # text may not start like a call
    ("auto", None, '<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>', False),
])
def test_the_grammar_allows_exactly_the_valid_outputs(grammars, tokenizer, tool_choice, parallel, text,
                                                      accepted):
    choice = parse_choice(tool_choice, TOOLS, parallel)
    assert _accepts(grammars, tokenizer, choice, text) == accepted


def _streamed(choice, text: str, step: int) -> tuple[list[dict], str]:
    parser, deltas = CallParser(choice), []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i:i + step])
    return deltas + parser.finish(), parser.finish_reason("stop")


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_the_parser_reads_calls_whole_and_streamed_alike(step):
    choice = parse_choice("required", TOOLS, None)
    tricky = ('<tool_call>{"name":"get_weather","arguments":{"city":"P}</tool_call>\\"{","unit":"celsius"}}'
              '</tool_call>')
    text = tricky + "\n" + SUM
    message, reason = CallParser(choice).message(text, "stop")
    assert reason == "tool_calls" and message["content"] is None
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'P}</tool_call>"{', "unit": "celsius"}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    deltas, reason = _streamed(choice, text, step)
    assert reason == "tool_calls"
    streamed = [call for d in deltas for call in d["tool_calls"]]
    assert [c["index"] for c in streamed] == [0, 1]
    assert [c["function"] for c in streamed] == [c["function"] for c in calls]


def test_text_and_calls_cut_short_are_content():
    auto = parse_choice("auto", TOOLS, None)
    assert CallParser(auto).message("Sunny.", "stop") == ({"role": "assistant", "content": "Sunny."}, "stop")
    deltas, reason = _streamed(auto, "Sunny.", 2)
    assert "".join(d["content"] for d in deltas) == "Sunny." and reason == "stop"
    cut = PARIS + "\n" + SUM[:20]  # max_tokens ended it inside the second call
    message, reason = CallParser(auto).message(cut, "length")
    assert reason == "length" and message["content"] == "\n" + SUM[:20]  # never a half call
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    deltas, reason = _streamed(auto, cut, 4)  # a stream says the same: the complete call, the rest as text
    assert len(deltas[0]["tool_calls"]) == 1 and deltas[1] == {"content": "\n" + SUM[:20]}
    assert reason == "stop"  # the engine's reason, never tool_calls after text
    message, reason = CallParser(auto).message(SUM[:20], "length")
    assert (message, reason) == ({"role": "assistant", "content": SUM[:20]}, "length")


@pytest.mark.parametrize("tools, param", [
    ([{}], "tools.0.function"),
    ([{"type": "code_interpreter"}], "tools.0.type"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools.0.function.name"),
    ([ADD, {"type": "function", "function": {"name": "ok", "parameters": []}}],
     "tools.1.function.parameters"),
    ([{"type": "function", "function": {"name": "ok", "parameters": {"type": "string"}}}],
     "tools.0.function.parameters"),
    ([ADD, {"type": "function", "function": {"name": "ok", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}], "tools.1.function.parameters"),
    ([ADD, ADD], "tools.1.function.name"),
])
def test_bad_tool_definitions_name_the_param(tools, param):
    with pytest.raises(ToolError) as err:
        _checked(tools)
    assert err.value.param == param


async def _compile_here(kind: str, spec: str) -> str | None:
    """The server's check_grammar, compiled in this process (the server's runs in its grammar checker)."""
    try:
        source = grammar_source(kind, spec)
    except InvalidGrammar as exc:
        return str(exc)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, None, limits=PARSER_LIMITS)
    return "; ".join(messages) if failed else None


def _checked(raw: list) -> tuple:
    """parse_tools, then each schema compiled (check_schemas), as a chat request's tools are."""
    tools = parse_tools(raw)
    asyncio.run(check_schemas(tools, _compile_here))
    return tools


def test_tool_schemas_are_compiled_by_the_check_given_never_by_parse_tools():
    """parse_tools holds schemas to the limits in Python; compiling is check_schemas', through the check it
    is given (the engine client's: the grammar checker's process), once per distinct schema."""
    asked: list[tuple[str, str]] = []

    async def check(kind: str, spec: str) -> str | None:
        asked.append((kind, spec))
        return "refused by the checker" if "nonsense" in spec else None

    nonsense = {"type": "object", "properties": {"x": {"type": "nonsense"}}}
    tools = parse_tools([WEATHER, ADD, {"type": "function", "function": {**ADD["function"], "name": "again"}},
                         {"type": "function", "function": {"name": "bad", "parameters": nonsense}}])
    with pytest.raises(ToolError, match="refused by the checker") as err:
        asyncio.run(check_schemas(tools, check))
    assert err.value.param == "tools.3.function.parameters"
    assert [kind for kind, _ in asked] == ["grammar"] * 3  # add's schema twice: checked once
    assert all(spec.startswith("start: %json ") for _, spec in asked)


def test_tool_choice_is_checked_against_the_tools():
    assert parse_tools([{"type": "function", "function": {"name": "now"}}])[0].parameters["type"] == "object"
    assert not parse_choice(None, (), None).active and parse_choice(None, TOOLS, None).mode == "auto"
    assert not parse_choice("none", TOOLS, None).active
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"type": "function"}):
        with pytest.raises(ToolError) as err:
            parse_choice(bad, TOOLS, None)
        assert err.value.param == "tool_choice"
    with pytest.raises(ToolError):
        parse_choice("required", (), None)
    assert not parse_choice("auto", (), None).active  # what clients sent before tools were served


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25 C"},
]


def test_a_template_without_tools_gets_them_in_a_system_message(tokenizer):
    assert not template_renders_tools(tokenizer)  # SmolLM2's template ignores tools=
    messages, tool_defs = chat_messages(CONVERSATION, parse_choice("auto", TOOLS, None), native=False)
    assert tool_defs is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == (
        '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>\n'
        '<tool_call>{"name":"get_weather","arguments":{"city":"Rome","unit":"celsius"}}</tool_call>')
    assert messages[3]["content"] == ("<tool_response>\n21 C\n</tool_response>\n"
                                      "<tool_response>\n25 C\n</tool_response>")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant" not in text  # the tools' system message replaces the default one
    # tool_choice none: no tools shown, the history still rendered
    messages, _ = chat_messages(CONVERSATION, parse_choice("none", TOOLS, None), native=False)
    assert messages[0]["role"] == "user" and "<tool_call>" in messages[1]["content"]
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{not json"}}]}]
    with pytest.raises(ToolError) as err:
        chat_messages(bad, parse_choice("auto", TOOLS, None), native=False)
    assert err.value.param == "messages.0.tool_calls.0.function.arguments"


def test_a_template_that_renders_tools_gets_them_natively(tokenizer):
    native = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    native.chat_template = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
        "{% endfor %}"
        "{% if m.role == 'tool' %} ({{ m.name }}){% endif %}\n{% endfor %}")
    assert template_renders_tools(native)
    messages, tool_defs = chat_messages(CONVERSATION, parse_choice("auto", TOOLS, None), native=True)
    text = native.apply_chat_template(messages, tools=tool_defs, tokenize=False)
    assert text.startswith("TOOL get_weather\nTOOL add\nuser: Weather")
    assert "CALL get_weather ParisCALL get_weather Rome" in text and "tool: 25 C (get_weather)" in text


def test_arguments_hold_only_the_declared_properties(grammars, tokenizer):
    """A schema that says nothing of other properties is closed (as OpenAI's strict mode), nested ones too;
    a property that happens to be named "properties" is a property, not a schema keyword."""
    open_schema = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }}}
    choice = parse_choice("required", parse_tools([open_schema]), None)
    call = '<tool_call>{"name":"f","arguments":%s}</tool_call>'
    assert _accepts(grammars, tokenizer, choice, call % '{"properties":{"x":1}}')
    assert not _accepts(grammars, tokenizer, choice, call % '{"properties":{"x":1},"maxLength":"20"}')
    assert not _accepts(grammars, tokenizer, choice, call % '{"properties":{"x":1,"y":2}}')
    explicit = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}},
        "additionalProperties": {"type": "integer"}}}}
    choice = parse_choice("required", parse_tools([explicit]), None)
    assert _accepts(grammars, tokenizer, choice, call % '{"x":1,"y":2}')  # what a schema says is kept


def test_schemas_that_cannot_be_compiled_are_client_errors():
    deep: dict = {"type": "integer"}
    for _ in range(1500):  # deeper than Python's recursion limit: a 400, not a crash
        deep = {"type": "object", "properties": {"a": deep}}
    for parameters in (deep, {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}):
        with pytest.raises(ToolError) as err:
            _checked([{"type": "function", "function": {"name": "f", "parameters": parameters}}])
        assert err.value.param == "tools.0.function.parameters"
