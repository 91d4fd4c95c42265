"""Tool calling on ``/v1/chat/completions``: OpenAI's ``tools`` / ``tool_choice`` as a prompt, a grammar and a
parser, so that a call the server returns is always well formed.

One call format everywhere: ``<tool_call>{"name":"NAME","arguments":{...}}</tool_call>``, several separated
by a newline (the Hermes / Qwen convention, so models trained on it need no teaching). The same format is
what the tool prompt teaches, what earlier assistant calls in the conversation are rendered as, what the
grammar forces and what the parser reads back:

- the prompt: a template that renders ``tools=`` itself gets them (and the conversation's calls and
  results in Hugging Face's shapes); one that ignores them (the default SmolLM2) gets a system message
  listing the tools as JSON and teaching the format, with earlier calls rendered in it and tool results
  as user turns inside ``<tool_response>``. (A model whose template teaches another call format is still
  held to this one; under ``auto`` its own format can only come out as text.)
- the grammar (a Lark grammar for llguidance, structured outputs' engine): ``required`` is one call (up to
  :data:`MAX_PARALLEL_CALLS` with ``parallel_tool_calls``) whose name is one of the tools and whose
  arguments follow that tool's ``parameters`` schema (closed: no properties beyond those it lists, see
  :func:`closed`), embedded with ``%json``; a named choice is the same with one tool; ``auto`` is either
  that or plain text, which then may not start with ``<``, so the first character decides which (and a
  stream can pass text through at once);
- the parser (:class:`~server.api.tool_calls.CallParser`) reads complete calls back, whole or streamed
  alike. Anything it cannot read as a call (only a call that ``max_tokens`` cut short, since the grammar
  allows nothing else) is content, and the finish reason is then the engine's (``length``), never
  ``tool_calls``.

Errors are :class:`ToolError` (what is wrong, and which parameter); the API layer maps them to 400s. Tool
schemas are held to the structured-output limits here, in Python (:func:`parse_tools`), and compiled only
in the grammar checker's process (:func:`check_schemas`): never in the HTTP process, where a crash of the
native grammar library would lose every request in flight.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from jinja2 import TemplateError

from server.engine.grammar import InvalidGrammar, check_limits, check_schema_depth

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_SEPARATOR = "\n"
MAX_PARALLEL_CALLS = 8  # with parallel_tool_calls: a small model may otherwise repeat calls until max_tokens
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI's meaning of a function without parameters
_COMPACT = {"whitespace_flexible": False}  # as structured outputs: no free whitespace a model could pad with


class ToolError(ValueError):
    """A tool definition, tool choice or conversation message that cannot be served; ``param`` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of the ``arguments`` object

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """What the output may be: ``none`` (plain text, no tools shown), ``auto`` (text or calls), ``required``
    (calls only). A named function is ``required`` with ``callable`` holding that one tool."""

    mode: str
    tools: tuple[Tool, ...] = ()  # shown to the model
    callable: tuple[Tool, ...] = ()  # the ones the output may call
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none"


NO_TOOLS = ToolChoice("none")
MAX_TOOLS = 128  # per request: each adds its schema to the prompt and to the call grammar


# ---------------------------------------------------------------------------------------------------------
# Request parameters


def _check_schema(schema: dict, param: str) -> None:
    """``schema`` within the structured-output limits (server/engine/grammar.py: depth, counted through
    ``$ref``, enum size, bytes), in Python; compiling it is :func:`check_schemas`, in the grammar checker."""
    try:
        check_schema_depth(schema)  # first: it stops at the limit, where json.dumps would hit Python's
        check_limits("json_schema", json.dumps(schema))
    except InvalidGrammar as exc:
        raise ToolError(f"{param}: {exc}", param) from None


def schema_grammar(schema: dict) -> str:
    """The Lark grammar of one tool's arguments, as the call grammar (:func:`grammar`) embeds them."""
    return "start: %json " + json.dumps({**closed(schema), "x-guidance": _COMPACT})


# (kind, spec) -> None when it compiles, else why not: the engine client's check_grammar, which compiles in
# the grammar checker's process (server/frontend/grammar_check.py), never in the HTTP process
GrammarCheck = Callable[[str, str], Awaitable[str | None]]


async def check_schemas(tools: tuple[Tool, ...], check: GrammarCheck) -> None:
    """Raise :class:`ToolError` naming the first tool whose ``parameters`` the grammar library cannot
    compile. llguidance is native code that a schema can crash (see server/engine/grammar.py), so it runs in
    the grammar checker's process: a crash there costs this request, which is told so, and nothing else."""
    checked: set[str] = set()
    for i, tool in enumerate(tools):
        source = schema_grammar(tool.parameters)
        if source in checked:  # many tools share a schema ({"type": "object"}): one check each
            continue
        checked.add(source)
        error = await check("grammar", source)
        if error is not None:
            param = f"tools.{i}.function.parameters"
            raise ToolError(f"{param} is not a JSON schema this server can follow: {error}", param)


def parse_tools(raw: list | None) -> tuple[Tool, ...]:
    """OpenAI's ``tools`` list, checked: ``type`` function, a valid unique name, ``parameters`` a JSON schema
    of an object."""
    if raw is not None and len(raw) > MAX_TOOLS:
        raise ToolError(f"{len(raw)} tools is over the limit of {MAX_TOOLS} per request (checked before the "
                        "prompt is rendered).", "tools")
    tools: list[Tool] = []
    for i, entry in enumerate(raw or ()):
        param = f"tools.{i}"
        if not isinstance(entry, dict) or entry.get("type", "function") != "function":
            raise ToolError(f"{param} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                            "{...}}}: function tools are the only kind served.", f"{param}.type")
        function = entry.get("function")
        if not isinstance(function, dict):
            raise ToolError(f"{param}.function must be an object with 'name' and 'parameters'.",
                            f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ToolError(f"{param}.function.name must be 1-64 letters, digits, '_' or '-', not {name!r}.",
                            f"{param}.function.name")
        if any(tool.name == name for tool in tools):
            raise ToolError(f"two tools are named {name!r}; names must be unique.", f"{param}.function.name")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{param}.function.description must be a string.",
                            f"{param}.function.description")
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError(f"{param}.function.parameters must be a JSON schema of an object "
                            "({'type': 'object', 'properties': {...}}).", f"{param}.function.parameters")
        _check_schema(parameters, f"{param}.function.parameters")
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


def parse_choice(raw: str | dict | None, tools: tuple[Tool, ...], parallel: bool | None) -> ToolChoice:
    """``tool_choice`` against ``tools``; OpenAI's default is ``auto`` with tools, ``none`` without."""
    if raw is None:
        raw = "auto" if tools else "none"
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', "
                            f"'function': {{'name': ...}}}}, not {raw!r}.", "tool_choice")
        if raw == "none" or (raw == "auto" and not tools):  # auto without tools: as before tools were served
            return NO_TOOLS
        if not tools:
            raise ToolError(f"tool_choice {raw!r} needs tools.", "tool_choice")
        return ToolChoice(raw, tools, tools, parallel is not False)
    function = raw.get("function") if raw.get("type", "function") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}.",
                        "tool_choice")
    named = [tool for tool in tools if tool.name == name]
    if not named:
        raise ToolError(f"tool_choice names {name!r}, which is not one of the tools "
                        f"({', '.join(t.name for t in tools) or 'none sent'}).", "tool_choice")
    return ToolChoice("required", tools, tuple(named), parallel=False)


# ---------------------------------------------------------------------------------------------------------
# The grammar


def _lark_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema):
    """``schema`` with ``additionalProperties: false`` wherever an object lists its properties and says
    nothing about others (OpenAI's strict mode): JSON schema's default would let a small model add keys of its
    own (it copies the schema's own ``maxLength``, ``type``...) until ``max_tokens`` cuts the call."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    return out


def grammar(choice: ToolChoice) -> str:
    """The Lark grammar (llguidance) of every output ``choice`` allows."""
    bodies = []
    for tool in choice.callable:
        head = '{"name":' + json.dumps(tool.name) + ',"arguments":'
        schema = json.dumps({**closed(tool.parameters), "x-guidance": _COMPACT})
        bodies.append(f"{_lark_literal(head)} %json {schema} {_lark_literal('}')}")
    more = f"({_lark_literal(CALL_SEPARATOR)} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if choice.parallel else ""
    rules = [f"calls: call {more}",
             f"call: {_lark_literal(CALL_OPEN)} body {_lark_literal(CALL_CLOSE)}",
             "body: " + " | ".join(bodies)]
    if choice.mode == "auto":
        rules = ["start: TEXT | calls", r"TEXT: /[^<][\s\S]*/"] + rules  # text that cannot open a call
    else:
        rules = ["start: calls"] + rules
    return "\n".join(rules) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The prompt


def render_call(name: str, arguments: dict) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                                  separators=(",", ":")) + CALL_CLOSE


def system_prompt(choice: ToolChoice) -> str:
    """What a model whose chat template ignores tools is told about them."""
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                   ensure_ascii=False) for t in choice.tools)
    example = render_call("<tool name>", {"<argument>": "<value>"})
    if choice.mode == "auto":
        when = "When a tool helps, call it; otherwise answer in plain text."
    elif len(choice.callable) == 1 and choice.callable != choice.tools:
        when = f"Answer by calling {choice.callable[0].name}."
    else:
        when = "Answer by calling a tool."
    several = " For several calls, put one per line." if choice.parallel else ""
    return (f"You can call these tools; each one's arguments follow its JSON schema:\n<tools>\n{listing}\n"
            f"</tools>\nTo call a tool, reply with only\n{example}\nwith the arguments as a JSON object."
            f"{several} Results come back inside <tool_response></tool_response>. {when}")


def tool_prompt(choice: ToolChoice, native: bool) -> str:
    """What shows ``choice``'s tools to the model: the system message that lists them (:func:`system_prompt`),
    or, for a template that renders ``tools=`` itself, their definitions as JSON, which such templates
    (Hermes, Qwen) embed as they are. Its tokens are what ``--max-tool-prompt-tokens`` caps."""
    if not choice.active:
        return ""
    if native:
        return "\n".join(json.dumps(tool.as_openai(), ensure_ascii=False) for tool in choice.tools)
    return system_prompt(choice)


@functools.lru_cache(maxsize=8)
def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template shows ``tools=`` to the model itself (else :func:`system_prompt` does)."""
    probe = [{"role": "user", "content": "hi"}]
    tool = Tool("probe_tool_0f3a", "", NO_PARAMETERS).as_openai()
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False)
        without = tokenizer.apply_chat_template(probe, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError):  # a template that fails on tools ignores them
        return False
    return with_tools != without


def _arguments(call: dict, param: str) -> tuple[str, dict, str | None]:
    """An earlier assistant tool call as (name, arguments, id), checked."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolError(f"{param} must be {{'type': 'function', 'id': ..., 'function': {{'name': ..., "
                        "'arguments': '<JSON>'}}.", param)
    assert isinstance(function, dict), "the name came from it"
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ToolError(f"{param}.function.arguments is not valid JSON.",
                            f"{param}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"{param}.function.arguments must be a JSON object.", f"{param}.function.arguments")
    return name, arguments, call.get("id")


def chat_messages(messages: list[dict], choice: ToolChoice,
                  native: bool) -> tuple[list[dict], list[dict] | None]:
    """The conversation (``role``, ``content`` as text, ``tool_calls``, ``tool_call_id``) as the chat
    template's messages and ``tools=`` argument. ``native``: the template renders tools, calls and results
    itself (Hugging Face's shapes: arguments as objects); otherwise they become text in the call format."""
    out: list[dict] = []
    # call id -> function name, to label results (looked up with a message's tool_call_id, maybe None)
    names: dict[str | None, str] = {}
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content") or ""
        calls = [_arguments(c, f"messages.{i}.tool_calls.{j}")
                 for j, c in enumerate(message.get("tool_calls") or ())]
        names.update({call_id: name for name, _, call_id in calls if isinstance(call_id, str)})
        if native:
            entry = {"role": role, "content": content}
            if calls:
                entry["tool_calls"] = [{"type": "function", "id": call_id,
                                        "function": {"name": name, "arguments": arguments}}
                                       for name, arguments, call_id in calls]
            if role == "tool":
                entry["tool_call_id"] = message.get("tool_call_id")
                name = names.get(message.get("tool_call_id"), message.get("name"))
                if name:
                    entry["name"] = name
            out.append(entry)
        elif role == "tool":  # a user turn: templates that ignore tools may not know a "tool" role
            result = f"<tool_response>\n{content}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":  # results of parallel calls: one turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result})
        else:
            text = CALL_SEPARATOR.join([content] * bool(content) + [render_call(n, a) for n, a, _ in calls])
            out.append({"role": role, "content": text})
    if not choice.active:
        return out, None
    if native:
        return out, [tool.as_openai() for tool in choice.tools]
    prompt = system_prompt(choice)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None
