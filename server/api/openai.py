"""OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, whole or streamed.

Every task the caller may use is a model (its task name is the model id); the base model's own id means no
prefix. Errors under ``/v1`` use OpenAI's JSON error shape so that OpenAI clients raise the right exception
(:func:`server.api.errors.add_openai_error_handlers`); the other routes keep FastAPI's ``{"detail": ...}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import cast

from fastapi import APIRouter, Request
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from prefixes.keys import InvalidTaskName
from prefixes.records import ResidentPrefix
from server.api import errors
from server.api.encode import check_text, encode_prompt, on_tokenizer_thread
from server.api.errors import OpenAIError
from server.api.openai_output import (
    Logprobs,
    Prompt,
    chat_chunks,
    completion_chunks,
    usage_body,
    whole_choices,
)
from server.api.schemas import (
    CANONICAL_INT,
    MAX_PROMPTS,
    STREAMED,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAISampling,
)
from server.api.streaming import open_stream, run_to_end
from server.api.tools import (
    NO_TOOLS,
    ToolChoice,
    ToolError,
    chat_messages,
    check_schemas,
    grammar,
    parse_choice,
    parse_tools,
    template_renders_tools,
    tool_prompt,
)
from server.auth import CurrentPrincipal, Principal
from server.engine.sequence import SamplingParams
from server.errors import UnknownTask
from server.frontend.request_state import RequestState
from server.state import ServerState, State
from server.tasks import resolve_prefix, visible_records

router = APIRouter(prefix="/v1", tags=["openai"])

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI's chat default is "until the context ends", but every request reserves its whole budget in the
# key/value memory at admission, so a bounded default keeps unbounded clients from crowding the batch.
CHAT_MAX_TOKENS = 1024
STARTED = int(time.time())  # "created" of the base model


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model {name!r} does not exist or you do not have access to it; "
                       "GET /v1/models lists the models you can use.", param="model", code="model_not_found")


# ---------------------------------------------------------------------------------------------------------
# Models


def _card(model_id: str, created: int, owned_by: str, parent: str | None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent}


def _model_cards(state: ServerState, principal: Principal) -> list[dict]:
    base = state.model_name  # the other served names are accepted, not listed: clients pick the first model
    cards = {base: _card(base, STARTED, "prefix-serve", None)}
    for record in visible_records(state.store, principal):
        # An own task shadows a shared one of the same name (lookup order), and the base id shadows both.
        cards.setdefault(record.name, _card(record.name, int(record.created_at),
                                            record.namespace or principal.tenant, base))
    return list(cards.values())


@router.get("/models", responses=errors.responses(401, openai=True))
async def list_models(state: State, principal: CurrentPrincipal):
    return {"object": "list", "data": await run_in_threadpool(_model_cards, state, principal)}


@router.get("/models/{model:path}", responses=errors.responses(401, 404, openai=True))
async def get_model(model: str, state: State, principal: CurrentPrincipal):
    cards = await run_in_threadpool(_model_cards, state, principal)
    card = next((c for c in cards if c["id"] == model), None)
    if card is None:
        raise model_not_found(model)
    return card


async def _resolve_model(state: ServerState, principal: Principal, name: str) -> ResidentPrefix | None:
    if name in state.model_names:
        return None
    try:
        return await resolve_prefix(state.store, principal, name)
    except (InvalidTaskName, UnknownTask):  # not a task name at all, or not one this caller can see
        raise model_not_found(name) from None


# ---------------------------------------------------------------------------------------------------------
# Requests


def _refuse(checks: list[tuple[str, bool]]) -> None:
    """400 for the first parameter sent with a value this server cannot honour (ignoring it would silently
    give the client something other than what it asked for)."""
    for param, unsupported in checks:
        if unsupported:
            raise OpenAIError(400, f"{param!r} is not supported by this server: leave it out or at its "
                              "default.", param=param)


def _token_ids(values: list[int], vocab_size: int, param: str) -> list[int]:
    bad = next((v for v in values if not 0 <= v < vocab_size), None)
    if bad is not None:
        raise OpenAIError(400, f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}).",
                          param=param)
    return values


def _structured(body: OpenAISampling) -> tuple[str, str] | None:
    """``response_format`` or vLLM's ``guided_*`` as the engine's plain (kind, spec); at most one of them."""
    asked: list[tuple[str, tuple[str, str]]] = []
    fmt = body.response_format or {}
    kind = fmt.get("type", "text")
    if kind == "json_object":
        asked.append(("response_format", ("json_object", "")))
    elif kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise OpenAIError(400, "response_format json_schema needs {'json_schema': {'name': ..., "
                              "'schema': {...}}}.", param="response_format")
        asked.append(("response_format", ("json_schema", json.dumps(schema))))
    elif kind != "text":
        raise OpenAIError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                          "json_schema).", param="response_format")
    if body.guided_json is not None:
        spec = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        asked.append(("guided_json", ("json_schema", spec)))
    if body.guided_regex is not None:
        asked.append(("guided_regex", ("regex", body.guided_regex)))
    if body.guided_choice is not None:
        asked.append(("guided_choice", ("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        asked.append(("guided_grammar", ("grammar", body.guided_grammar)))
    if len(asked) > 1:
        raise OpenAIError(400, f"send one structured-output constraint, not {[p for p, _ in asked]}.",
                          param=asked[1][0])
    return asked[0][1] if asked else None


def _sampling(body: OpenAISampling, max_tokens: int, vocab_size: int, *, logprobs: int | None = None,
              prompt_logprobs: int | None = None, tools: ToolChoice = NO_TOOLS) -> list[SamplingParams]:
    """One set of parameters per choice; choice ``i`` is seeded ``seed + i`` so choices differ yet replay.
    Tool calling constrains the output with its own grammar (the route refuses it with another one)."""
    structured = ("grammar", grammar(tools)) if tools.active else _structured(body)
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not CANONICAL_INT.fullmatch(key):  # as the schema says: "7", not "07", "+7" or " 7"
            raise OpenAIError(400, f"logit_bias keys are token ids, not {key!r}.", param="logit_bias")
        bias.append((_token_ids([int(key)], vocab_size, "logit_bias")[0], value))
    stop_ids = tuple(_token_ids(body.stop_token_ids or [], vocab_size, "stop_token_ids"))
    try:
        return [SamplingParams(max_new_tokens=max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               top_k=max(body.top_k or 0, 0),
                               seed=None if body.seed is None else body.seed + i,
                               stop=tuple(body.stop), ignore_eos=bool(body.ignore_eos),
                               min_tokens=body.min_tokens or 0, stop_token_ids=stop_ids,
                               presence_penalty=body.presence_penalty or 0.0,
                               frequency_penalty=body.frequency_penalty or 0.0,
                               repetition_penalty=body.repetition_penalty or 1.0, logit_bias=tuple(bias),
                               logprobs=logprobs, prompt_logprobs=prompt_logprobs, structured=structured)
                for i in range(body.n or 1)]
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from None


async def _respond(state: ServerState, principal: Principal, request: Request, body: OpenAISampling,
                   prompts: list[Prompt], prefix: ResidentPrefix | None, max_tokens: int, *, chat: bool,
                   logprobs: int | None = None, echo: bool = False, tools: ToolChoice = NO_TOOLS):
    vocab_size = state.base.vocab_size
    prompt_logprobs = logprobs if echo and logprobs is not None else None
    params = _sampling(body, max_tokens, vocab_size, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                       tools=tools)
    # OpenAI's indexing: choice p * n + i is sample i of prompt p
    seqs = [RequestState(prompt.ids, p, prefix, tenant=principal.tenant)
            for prompt in prompts for p in params]
    n = len(params)
    fmt = Logprobs(state.base.tokenizer)
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    cap = state.settings.max_request_tokens or 4 * state.base.shape.max_positions
    if prompt_tokens * n > cap:  # each choice computes its prompt (bar prefix-cache hits): bound the work
        raise OpenAIError(400, f"this request asks for {prompt_tokens * n} prompt tokens ({len(prompts)} "
                          f"prompt(s), {prompt_tokens} tokens, x n={n}), over this server's limit of {cap} "
                          "per request (--max-request-tokens): send fewer or shorter prompts, or lower n.",
                          param="prompt")

    def cached() -> int:
        """Prompt positions not computed for this request: each prompt's task prefix (its key/values are
        stored), plus what its samples took from the prefix cache (the most any of its n samples took)."""
        return sum(seqs[i].num_prefix_kv + max(seq.num_cached_tokens for seq in seqs[i: i + n])
                   for i in range(0, len(seqs), n))

    if body.timeout is not None:
        for seq in seqs:
            seq.deadline = seq.arrival_time + body.timeout
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": None,
            "created": int(time.time()), "model": body.model}  # "object" is filled in per response kind
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage = lambda completion_tokens: usage_body(prompt_tokens, completion_tokens, cached())
        if chat:
            render = lambda pieces: chat_chunks(pieces, head, len(seqs), usage, include_usage, fmt, tools)
        else:
            render = lambda pieces: completion_chunks(pieces, head, seqs, prompts, n, usage,
                                                      include_usage, fmt, echo)
        return await open_stream(state, principal, seqs, render)
    seqs = await run_to_end(state, principal, request, seqs)
    choices = whole_choices(seqs, prompts, n, fmt, chat=chat, logprobs=logprobs, echo=echo, tools=tools)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage_body(prompt_tokens, sum(len(seq.output_ids) for seq in seqs), cached())}


async def _completion_prompts(state: ServerState, prompt) -> list[Prompt]:
    """A string, strings, token ids or lists of token ids -> one prompt each (echoed as sent). Text is
    size-checked and tokenized off the event loop (server/api/encode.py)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError(400, "'prompt' is empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise OpenAIError(400, f"at most {MAX_PROMPTS} prompts per request.", param="prompt")
    tokenizer = state.base.tokenizer
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(Prompt(await encode_prompt(state, p), p))
        else:
            ids = _token_ids(list(p), state.base.vocab_size, "prompt")
            # one sequence of ids decodes to one string (transformers types decode's result for batches too)
            text = cast(str, await on_tokenizer_thread(tokenizer.decode, ids))
            out.append(Prompt(ids, text))
    return out


@router.post("/completions",
             responses={**STREAMED, **errors.responses(400, 401, 404, 413, 429, 503, openai=True)})
async def completions(body: CompletionRequest, state: State, request: Request, principal: CurrentPrincipal):
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise OpenAIError(400, f"best_of must equal n ({n}): each choice is its own best here.",
                          param="best_of")
    _refuse([("suffix", bool(body.suffix))])
    max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise OpenAIError(400, "max_tokens 0 is only meaningful with echo (scoring the prompt).",
                          param="max_tokens")
    prefix = await _resolve_model(state, principal, body.model)
    prompts = await _completion_prompts(state, body.prompt)
    return await _respond(state, principal, request, body, prompts, prefix, max_tokens, chat=False,
                          logprobs=body.logprobs, echo=bool(body.echo))


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content or () if isinstance(part.get("text"), str)]


def _check_tool_prompt(tokenizer, tools: ToolChoice, native: bool, cap: int) -> None:
    """400 when the tools would take more than ``cap`` tokens of the prompt: counted on their part alone,
    before the conversation is rendered (the count and byte caps came before this); only active tools are
    shown, so only they are counted (:func:`tool_prompt`)."""
    count = len(tokenizer.encode(tool_prompt(tools, native), add_special_tokens=False))
    if count > cap:
        raise OpenAIError(400, f"the tools take {count} tokens of the prompt, over the limit of {cap} per "
                          "request (--max-tool-prompt-tokens): send fewer tools, or shorter descriptions "
                          "and schemas.", param="tools")


def _chat_prompt_ids(tokenizer, body: ChatCompletionRequest, tools: ToolChoice) -> list[int]:
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):  # content parts: only text can reach a language model
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise OpenAIError(400, "Only text content parts are supported.",
                                  param=f"messages.{i}.content")
            content = "".join(part["text"] for part in content)
        messages.append({"role": message.role, "content": content or "", "tool_calls": message.tool_calls,
                         "tool_call_id": message.tool_call_id, "name": message.name})
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "The base model has no chat template; use /v1/completions.", param="messages")
    try:
        messages, tool_defs = chat_messages(messages, tools, template_renders_tools(tokenizer))
    except ToolError as exc:
        raise OpenAIError(400, str(exc), param=exc.param) from None
    try:
        if tool_defs is None:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            out = tokenizer.apply_chat_template(messages, tools=tool_defs, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise OpenAIError(400, f"The chat template rejected these messages: {exc}",
                          param="messages") from None
    return list(out["input_ids"] if isinstance(out, Mapping) else out)  # transformers 5: a BatchEncoding


@router.post("/chat/completions",
             responses={**STREAMED, **errors.responses(400, 401, 404, 413, 429, 503, openai=True)})
async def chat_completions(body: ChatCompletionRequest, state: State, request: Request,
                           principal: CurrentPrincipal):
    _refuse([("top_logprobs", bool(body.top_logprobs) and not body.logprobs),
             ("functions", bool(body.functions)),
             ("function_call", body.function_call not in (None, "none", "auto"))])
    if body.tools:
        check_text(state, json.dumps(body.tools, ensure_ascii=False), "tools")
    tools = await _tool_choice(state, body, state.settings.max_tool_prompt_tokens
                               or state.base.shape.max_positions // 2)
    prefix = await _resolve_model(state, principal, body.model)
    # rendered into the prompt
    calls = [message.tool_calls for message in body.messages if message.tool_calls]
    check_text(state, "".join(text for message in body.messages for text in _texts(message.content))
               + (json.dumps(calls, ensure_ascii=False) if calls else ""), "messages")
    prompt_ids = await on_tokenizer_thread(_chat_prompt_ids, state.base.tokenizer, body, tools)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens == 0:
        raise OpenAIError(400, "max_tokens must be at least 1 for chat.", param="max_tokens")
    if max_tokens is None:  # as much as fits, up to the default (too little room is the engine's 400)
        used = len(prompt_ids) + (prefix.num_virtual_tokens if prefix else 0)
        max_tokens = max(1, min(CHAT_MAX_TOKENS, state.base.shape.max_positions - used))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _respond(state, principal, request, body, [Prompt(prompt_ids, "")], prefix, max_tokens,
                          chat=True, logprobs=logprobs, tools=tools)


async def _tool_choice(state: ServerState, body: ChatCompletionRequest, tool_cap: int) -> ToolChoice:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked: each tool's schema within the limits
    here, the tools' part of the prompt within ``tool_cap`` tokens, then (only when tools may be called:
    ``tool_choice`` 'none' compiles nothing) each schema compiled in the grammar checker's process
    (server/frontend/grammar_check.py); the cheap checks first, so a request they refuse costs no compile."""
    try:
        parsed = await run_in_threadpool(parse_tools, body.tools)
        tools = parse_choice(body.tool_choice, parsed, body.parallel_tool_calls)
        if tools.active and _structured(body) is not None:
            raise OpenAIError(400, "tool calls follow their own grammar: send tools or a structured-output "
                              "constraint (response_format, guided_*), not both, or set tool_choice 'none'.",
                              param="tool_choice")
        if tools.active:
            tokenizer = state.base.tokenizer
            await on_tokenizer_thread(_check_tool_prompt, tokenizer, tools, template_renders_tools(tokenizer),
                                      tool_cap)
            await check_schemas(parsed, state.engine.check_grammar)
    except ToolError as exc:
        raise OpenAIError(400, str(exc), param=exc.param) from None
    return tools
