"""OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, whole or streamed.

Every task the caller may use is a model (its task name is the model id); the base model's own id means no
prefix. Errors under ``/v1`` use OpenAI's JSON error shape so that OpenAI clients raise the right exception
(see :func:`add_exception_handlers`); the other routes keep FastAPI's ``{"detail": ...}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixes.store import ResidentPrefix
from server.api import errors
from server.api.encode import check_text, encode_prompt, on_tokenizer_thread
from server.api.schemas import ChatCompletionRequest, CompletionRequest, OpenAISampling
from server.api.streaming import Piece, error_body, open_stream, run_to_end
from server.auth import CurrentPrincipal, Principal
from server.engine.sequence import SamplingParams, Sequence
from server.state import ServerState, State
from server.tasks import resolve_prefix, visible_records

router = APIRouter(prefix="/v1", tags=["openai"])

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI's chat default is "until the context ends", but every request reserves its whole budget in the
# key/value memory at admission, so a bounded default keeps unbounded clients from crowding the batch.
CHAT_MAX_TOKENS = 1024
STARTED = int(time.time())  # "created" of the base model


class OpenAIError(HTTPException):
    """An HTTP error that also says which parameter is at fault and OpenAI's machine-readable ``code``."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(status_code, message)
        self.param, self.code = param, code


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model {name!r} does not exist or you do not have access to it; "
                       "GET /v1/models lists the models you can use.", param="model", code="model_not_found")


# ---------------------------------------------------------------------------------------------------------
# Models


def _card(model_id: str, created: int, owned_by: str, parent: str | None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent}


def _model_cards(state: ServerState, principal: Principal) -> list[dict]:
    base = state.base.model_id
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
    if name == state.base.model_id:
        return None
    try:
        return await resolve_prefix(state.store, principal, name)
    except HTTPException as exc:
        if exc.status_code in (400, 404):  # not a task name at all, or not one this caller can see
            raise model_not_found(name) from None
        raise


# ---------------------------------------------------------------------------------------------------------
# Requests


def _refuse(checks: list[tuple[str, bool]]) -> None:
    """400 for the first parameter sent with a value this server cannot honour (ignoring it would silently
    give the client something other than what it asked for)."""
    for param, unsupported in checks:
        if unsupported:
            raise OpenAIError(400, f"{param!r} is not supported by this server: leave it out or at its "
                              "default.", param=param)


def _common_checks(body: OpenAISampling) -> list[tuple[str, bool]]:
    return [("presence_penalty", bool(body.presence_penalty)),
            ("frequency_penalty", bool(body.frequency_penalty)),
            ("logit_bias", bool(body.logit_bias))]


def _sampling(body: OpenAISampling, max_tokens: int) -> list[SamplingParams]:
    """One set of parameters per choice; choice ``i`` is seeded ``seed + i`` so choices differ yet replay."""
    try:
        return [SamplingParams(max_new_tokens=max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               top_k=body.top_k or 0, seed=None if body.seed is None else body.seed + i,
                               stop=tuple(body.stop), ignore_eos=bool(body.ignore_eos))
                for i in range(body.n or 1)]
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _respond(state: ServerState, principal: Principal, request: Request, body: OpenAISampling,
                   prompt_ids: list[int], prefix: ResidentPrefix | None, max_tokens: int, *, chat: bool):
    seqs = [Sequence(prompt_ids, params, prefix, tenant=principal.tenant)
            for params in _sampling(body, max_tokens)]
    if body.timeout is not None:
        for seq in seqs:
            seq.deadline = seq.arrival_time + body.timeout
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": None,
            "created": int(time.time()), "model": body.model}  # "object" is filled in per response kind
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        render = _chat_chunks if chat else _completion_chunks
        n, prompt_tokens = len(seqs), len(prompt_ids)
        return await open_stream(state, principal, seqs,
                                 lambda pieces: render(pieces, head, n, prompt_tokens, include_usage))
    seqs = await run_to_end(state, principal, request, seqs)
    choices = []
    for i, seq in enumerate(seqs):
        text = seq.text or ""
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices.append({"index": i, **choice, "logprobs": None, "finish_reason": seq.finish_reason.value})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": _usage(len(prompt_ids), sum(len(seq.output_ids) for seq in seqs))}


async def _completion_chunks(pieces: AsyncIterator[Piece], head: dict, n: int, prompt_tokens: int,
                             include_usage: bool) -> AsyncIterator[dict]:
    head = {**head, "object": "text_completion"}
    completion_tokens = 0
    async for piece in pieces:
        completion_tokens += len(piece.token_ids)
        if piece.text or piece.finish_reason:
            yield {**head, "choices": [{"index": piece.index, "text": piece.text, "logprobs": None,
                                        "finish_reason": piece.finish_reason}]}
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}


async def _chat_chunks(pieces: AsyncIterator[Piece], head: dict, n: int, prompt_tokens: int,
                       include_usage: bool) -> AsyncIterator[dict]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}]}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    completion_tokens = 0
    async for piece in pieces:
        completion_tokens += len(piece.token_ids)
        if piece.text:
            yield chunk(piece.index, {"content": piece.text})
        if piece.finish_reason:
            yield chunk(piece.index, {}, piece.finish_reason)
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}


@router.post("/completions", responses=errors.responses(400, 401, 404, 413, 429, 503, openai=True))
async def completions(body: CompletionRequest, state: State, request: Request, principal: CurrentPrincipal):
    n = body.n or 1
    _refuse(_common_checks(body) + [
        ("echo", bool(body.echo)), ("logprobs", body.logprobs is not None),
        ("best_of", body.best_of is not None and body.best_of != n), ("suffix", bool(body.suffix))])
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(400, "'prompt' must be a string (or a list holding one string); token-id prompts "
                          "and batches of prompts are not supported.", param="prompt")
    prefix = await _resolve_model(state, principal, body.model)
    prompt_ids = await encode_prompt(state, prompt)
    return await _respond(state, principal, request, body, prompt_ids, prefix,
                          body.max_tokens or COMPLETION_MAX_TOKENS, chat=False)


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content or () if isinstance(part.get("text"), str)]


def _chat_prompt_ids(tokenizer, body: ChatCompletionRequest) -> list[int]:
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):  # content parts: only text can reach a language model
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise OpenAIError(400, "Only text content parts are supported.",
                                  param=f"messages.{i}.content")
            content = "".join(part["text"] for part in content)
        messages.append({"role": message.role, "content": content or ""})
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "The base model has no chat template; use /v1/completions.", param="messages")
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise OpenAIError(400, f"The chat template rejected these messages: {exc}",
                          param="messages") from None
    return list(out["input_ids"] if isinstance(out, Mapping) else out)  # transformers 5: a BatchEncoding


@router.post("/chat/completions",
             responses=errors.responses(400, 401, 404, 413, 429, 503, openai=True))
async def chat_completions(body: ChatCompletionRequest, state: State, request: Request,
                           principal: CurrentPrincipal):
    _refuse(_common_checks(body) + [
        ("logprobs", bool(body.logprobs)), ("top_logprobs", bool(body.top_logprobs)),
        ("tools", bool(body.tools)), ("tool_choice", body.tool_choice not in (None, "none", "auto")),
        ("functions", bool(body.functions)),
        ("function_call", body.function_call not in (None, "none", "auto")),
        ("response_format", (body.response_format or {}).get("type", "text") != "text")])
    prefix = await _resolve_model(state, principal, body.model)
    check_text(state, "".join(text for message in body.messages for text in _texts(message.content)), "messages")
    prompt_ids = await on_tokenizer_thread(_chat_prompt_ids, state.base.tokenizer, body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # as much as fits, up to the default (too little room is the engine's 400)
        used = len(prompt_ids) + (prefix.num_virtual_tokens if prefix else 0)
        max_tokens = max(1, min(CHAT_MAX_TOKENS, state.base.shape.max_positions - used))
    return await _respond(state, principal, request, body, prompt_ids, prefix, max_tokens, chat=True)


# ---------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape, for /v1 only


def _is_openai_route(request: Request) -> bool:
    return request.url.path == "/v1" or request.url.path.startswith("/v1/")


_ERROR_TYPES = {401: ("authentication_error", "invalid_api_key"), 403: ("permission_error", None),
                429: ("rate_limit_error", "rate_limit_exceeded")}


async def _http_error(request: Request, exc: StarletteHTTPException):
    if not _is_openai_route(request):
        return await http_exception_handler(request, exc)
    status = exc.status_code
    default = ("server_error" if status >= 500 else "invalid_request_error", None)
    type_, code = _ERROR_TYPES.get(status, default)
    body = error_body(str(exc.detail), type_, getattr(exc, "code", None) or code, getattr(exc, "param", None))
    return JSONResponse(body, status_code=status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    if not _is_openai_route(request):
        return await request_validation_exception_handler(request, exc)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        param, message = None, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    else:
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    # OpenAI answers every malformed request with 400, where FastAPI would say 422
    return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
