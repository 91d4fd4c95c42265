"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from pydantic.json_schema import JsonDict

from prefixes.keys import TASK_NAME
from server.api.tools import MAX_TOOLS, TOOL_NAME

# A deadline shorter than this could pass before an idle server's next step admits the request: a client
# error (422), not a 503 for a server that was never busy.
MIN_TIMEOUT_S = 0.1
TIMEOUT_HELP = ("seconds this request may wait for a place in the batch (default: the server's "
                "--request-timeout); past it, it leaves the queue unserved with a 503")


# The schema states every rule a request must meet that JSON Schema can say, so that a client (or a fuzzer)
# that follows it is not refused. Rules the routes check themselves and answer with their own 400 message
# appear here only as schema (``json_schema_extra``), not as pydantic validation with its 422 list:
# - names (tasks, tenants) follow :data:`prefixes.keys.TASK_NAME`;
# - token ids are below the vocabulary size, which only the served model knows: fields marked
#   ``x-vocabulary`` get their ``maximum`` when the app renders its schema (server/app.py), and so do
#   numbers of tokens to generate (``x-context``: the served model's context).
# Request bodies are strict: "5" is not the integer 5, as the schema says.
NAME_PATTERN = f"^{TASK_NAME.pattern}$"
_NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
TaskPath = Annotated[str, Path(description=f"the task's name: {_NAME_RULE}",
                               json_schema_extra={"pattern": NAME_PATTERN})]
TenantQuery = Annotated[str | None, Query(
    description="admins only, with --auth-file: act on this tenant's task instead of a shared one",
    json_schema_extra={"pattern": NAME_PATTERN})]
TaskQuery = Annotated[str | None, Query(description=f"task name ({_NAME_RULE}); omit for the base model",
                                        json_schema_extra={"pattern": NAME_PATTERN})]
CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")
# Seeds are integers a JSON number holds exactly (2**53 - 1, I-JSON's bound): clients in JavaScript can send
# every one, and a schema bound that float parsers round cannot be misread.
MAX_SEED = 2**53 - 1
# Every integer is bounded: one past what the engine's messages carry (64 bits) was a 500. A top-k above the
# vocabulary keeps every token.
MAX_TOP_K = 2**31 - 1
# The 200 of a route that streams with ``stream: true``: JSON otherwise.
STREAMED: dict[int | str, dict] = {200: {
    "description": "The result; with stream: true, Server-Sent Events (data: <JSON chunk> lines)",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}}}
# at most the context less one prompt token (filled in as the vocabulary bounds are)
CONTEXT_BOUND: JsonDict = {"x-context": True}
ModelTokenId = Annotated[int, Field(ge=0, json_schema_extra={"x-vocabulary": "model"})]
TokenizerTokenId = Annotated[int, Field(ge=0, json_schema_extra={"x-vocabulary": "tokenizer"})]


def _integral_floats(value: Any) -> Any:
    """JSON Schema's integers include 7.0; pydantic's strict ints do not: such floats become ints first."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats(item) for item in value]
    return value


class Body(BaseModel):
    """A request body validated as its schema reads: strict types ("5" is not 5, 1 is not true), with
    JSON Schema's notion of an integer. Nested models are reached through their parent's walk."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_numbers(cls, value: Any) -> Any:
        return _integral_floats(value)


def _one_or_many_schema(schema: dict) -> None:
    """``stop``'s schema: one string, a list of them, or null (the validator makes each a list)."""
    array = dict(schema)
    schema.clear()
    schema["anyOf"] = [array["items"], array, {"type": "null"}]


StopString = Annotated[str, Field(min_length=1)]  # an empty stop string would stop at once


class GenerateRequest(Body):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not silently ignored

    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=65536, json_schema_extra=CONTEXT_BOUND)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 disables top-k")
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED,
                             description="negative (clients send -1): unseeded")
    stop: list[StopString] = Field(default_factory=list, max_length=16, json_schema_extra=_one_or_many_schema)
    ignore_eos: bool = False
    stream: bool = Field(False, description="Server-Sent Events: text deltas and new token ids as generated")
    timeout: float | None = Field(None, ge=MIN_TIMEOUT_S, le=86400, description=TIMEOUT_HELP)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _stop_list(value)

    @field_validator("seed")
    @classmethod
    def _negative_is_unseeded(cls, value):
        return _seed(value)


def _seed(value: int | None) -> int | None:
    """vLLM's convention, which clients follow: a negative seed (usually -1) means "do not seed"."""
    return None if value is None or value < 0 else value


def _stop_list(value):
    """``stop`` may be one string or a list (or null: none)."""
    if isinstance(value, str):
        value = [value]
    if value is None:
        return []
    return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str | None
    text: str
    token_ids: list[int]  # generated ids only (an EOS that ended generation included)
    finish_reason: str
    usage: Usage


class PrefixInfo(BaseModel):
    task: str
    kind: str
    num_virtual_tokens: int
    sha256: str
    version: int
    bytes: int
    source_format: str
    created_at: float
    owner: str | None = None  # the owning tenant's namespace; "_shared" for admin-published tasks


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]


# ---------------------------------------------------------------------------------------------------------
# OpenAI-compatible bodies. Unknown fields are ignored (clients send many this server has no use for); the
# meaningful ones it cannot honour are refused by the routes. ``None`` means "not sent": clients send nulls.

MAX_CHOICES = 16  # ``n``: one request may not take over the batch


MAX_LOGPROBS = 20  # OpenAI's limit for ``logprobs`` / ``top_logprobs``
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)  # validated inside a Body

    include_usage: bool = False


# At most one structured-output constraint per request (response_format other than text, or a guided_*).
_CONSTRAINTS: dict[str, JsonDict] = {"response_format": {"type": "object", "required": ["type"],
                                    "properties": {"type": {"enum": ["json_object", "json_schema"]}}},
                **{name: {"not": {"type": "null"}}
                   for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")}}
ONE_CONSTRAINT: list[JsonValue] = [
    {"not": {"required": [a, b], "properties": {a: _CONSTRAINTS[a], b: _CONSTRAINTS[b]}}}
    for i, a in enumerate(_CONSTRAINTS) for b in list(_CONSTRAINTS)[i + 1:]]


class OpenAISampling(Body):
    # Non-finite floats (JSON has none, but Python's parser reads NaN and Infinity) are refused up front.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=0, le=65536, json_schema_extra=CONTEXT_BOUND)  # 0: with echo
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED - MAX_CHOICES)  # choice i is seeded seed + i
    stop: list[StopString] = Field(default_factory=list, max_length=16, json_schema_extra=_one_or_many_schema)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    timeout: float | None = Field(None, ge=MIN_TIMEOUT_S, le=86400, description=TIMEOUT_HELP)  # an extension
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # token id (a string) -> bias
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, json_schema_extra={"x-vocabulary-keys": "model"})
    response_format: dict | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "null"},
        {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "required": ["schema"], "properties": {
                "schema": {"type": "object"}}}}}]})
    # vLLM's extensions, honoured because clients written for vLLM (lm-eval, guidellm) send them
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)  # -1 or 0: no top-k cut
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(None, ge=0, le=65536)
    stop_token_ids: list[ModelTokenId] | None = Field(None, max_length=64)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark grammar

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _stop_list(value)

    @field_validator("seed")
    @classmethod
    def _negative_is_unseeded(cls, value):
        return _seed(value)


class CompletionRequest(OpenAISampling):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        # max_tokens 0 scores the prompt: only meaningful with echo
        {"if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
         "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]}},
        *ONE_CONSTRAINT]})

    # a string, a list of strings, a list of token ids, or a list of token-id lists (one choice block each)
    prompt: str | list[str] | list[ModelTokenId] | list[list[ModelTokenId]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="served only equal to n")
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0}, description="not supported")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # validated inside a Body

    role: str
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message: the call it answers
    name: str | None = None


# OpenAI's tool definitions as server/api/tools.py accepts them (JSON Schema cannot say that names are
# unique, that a named tool_choice names one of the tools, or which schemas the grammar library follows).
TOOL_SCHEMA: JsonDict = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": f"^{TOOL_NAME.pattern}$"},
        "description": {"type": ["string", "null"]},
        "parameters": {"type": "object", "properties": {"type": {"const": "object"}}}}}}}
NAMED_TOOL_SCHEMA: JsonDict = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}


NO_CONSTRAINT_BESIDE_TOOLS: list[JsonValue] = [
    {"not": {"required": ["tools", name], "properties": {
        "tools": {"type": "array", "minItems": 1}, name: constraint,
        "tool_choice": {"not": {"const": "none"}}}}}
    for name, constraint in _CONSTRAINTS.items()]


class ChatCompletionRequest(OpenAISampling):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"top_logprobs": {"minimum": 1}}, "required": ["top_logprobs"]},
         "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}},
        # a tool_choice that asks for a call needs tools to call
        {"if": {"properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
                "required": ["tool_choice"]},
         "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}},
        # tool calls follow their own grammar: no other constraint beside tools that may be called
        *NO_CONSTRAINT_BESIDE_TOOLS,
        *ONE_CONSTRAINT]})

    messages: list[ChatMessage] = Field(..., min_length=1)
    # the newer name of max_tokens
    max_completion_tokens: int | None = Field(None, ge=1, le=65536, json_schema_extra=CONTEXT_BOUND)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # checked by server/api/tools.py, which names the faulty field; the schema says what it accepts
    tools: list | None = Field(None, json_schema_extra={"maxItems": MAX_TOOLS, "items": TOOL_SCHEMA})
    tool_choice: str | dict | None = Field(None, json_schema_extra={"anyOf": [
        {"enum": ["none", "auto", "required"]}, NAMED_TOOL_SCHEMA, {"type": "null"}]})
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated function calling: only its "off" values are served (tools replace it)
    functions: list | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: str | dict | None = Field(None, json_schema_extra={"enum": [None, "none", "auto"]})


def below(n: int) -> str:
    """A regular expression matching exactly the decimal numbers 0..n-1 as written canonically (no sign,
    no leading zeros): the token-id keys of ``logit_bias`` for a vocabulary of ``n``."""
    top = str(n - 1)
    shorter = [r"0"] + ([rf"[1-9][0-9]{{0,{len(top) - 2}}}"] if len(top) > 1 else [])
    same = []
    for i, digit in enumerate(top):
        low = "1" if i == 0 else "0"
        if int(digit) > int(low):
            same.append(top[:i] + f"[{low}-{int(digit) - 1}]" + (rf"[0-9]{{{len(top) - i - 1}}}"
                                                                  if i < len(top) - 1 else ""))
    if top != "0":
        same.append(top)
    return "^(" + "|".join(shorter + same) + ")$"


def fill_model_bounds(node: Any, sizes: dict[str, int], positions: int) -> None:
    """Where the schema marks token ids (``x-vocabulary``: "model" or "tokenizer"), state the served
    vocabulary's bound: ``maximum`` for ids, ``propertyNames`` for token-id keys; where it marks a number of
    tokens to generate (``x-context``), the context's. In place."""
    if isinstance(node, dict):
        if node.get("x-context"):
            node["maximum"] = min(node.get("maximum", positions), positions - 1)
        if (which := node.get("x-vocabulary")) in sizes:
            node["maximum"] = sizes[which] - 1
        if (which := node.get("x-vocabulary-keys")) in sizes:
            node["propertyNames"] = {"pattern": below(sizes[which])}
        for value in node.values():
            fill_model_bounds(value, sizes, positions)
    elif isinstance(node, list):
        for value in node:
            fill_model_bounds(value, sizes, positions)
