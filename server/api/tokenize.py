"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` in vLLM's shapes: clients such as lm-eval use them
to count and split tokens exactly as the server does (its ``remote`` tokenizer backend needs all three)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from server.api import errors
from server.api.encode import check_text, on_tokenizer_thread
from server.api.schemas import Body, TokenizerTokenId
from server.auth import CurrentPrincipal
from server.state import State

router = APIRouter(tags=["tokenizer"])


class TokenizeMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # validated inside a Body

    role: str
    content: str


class TokenizeRequest(Body):
    # exactly one of prompt and messages
    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": [
        {"properties": {"prompt": {"type": "string"}}, "required": ["prompt"],
         "not": {"properties": {"messages": {"type": "array"}}, "required": ["messages"]}},
        {"properties": {"messages": {"type": "array"}}, "required": ["messages"],
         "not": {"properties": {"prompt": {"type": "string"}}, "required": ["prompt"]}}]})

    model: str | None = None  # every task shares the base model's tokenizer
    prompt: str | None = None
    # chat: the prompt is the chat template's rendering
    messages: list[TokenizeMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenizerTokenId] = Field(..., max_length=1 << 20)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - the template's own errors: the client's messages do not fit it
        raise HTTPException(400, f"the chat template rejected these messages: {exc}") from None
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@router.post("/tokenize", responses=errors.responses(400, 401, 413))
async def tokenize(body: TokenizeRequest, state: State, principal: CurrentPrincipal):
    tokenizer = state.base.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise HTTPException(400, "send either 'prompt' (text) or 'messages' (chat)")
    if body.prompt is not None:
        check_text(state, body.prompt)
        out = await on_tokenizer_thread(tokenizer, body.prompt, add_special_tokens=body.add_special_tokens)
        ids = out["input_ids"]
    else:
        messages = [message.model_dump() for message in body.messages or ()]
        check_text(state, json.dumps(messages), "messages")
        ids = await on_tokenizer_thread(_chat_ids, tokenizer, messages, body.add_generation_prompt)
    return {"count": len(ids), "max_model_len": state.base.shape.max_positions, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}


@router.post("/detokenize", responses=errors.responses(400, 401, 413))
async def detokenize(body: DetokenizeRequest, state: State, principal: CurrentPrincipal):
    vocab = len(state.base.tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise HTTPException(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return {"prompt": await on_tokenizer_thread(state.base.tokenizer.decode, body.tokens)}


@router.get("/tokenizer_info", responses=errors.responses(401))
async def tokenizer_info(state: State, principal: CurrentPrincipal):
    """The tokenizer's configuration, as vLLM reports it (special tokens, chat template, context length)."""
    tokenizer = state.base.tokenizer
    info = {"tokenizer_class": type(tokenizer).__name__, "model_max_length": state.base.shape.max_positions,
            "vocab_size": len(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None),
            "add_bos_token": getattr(tokenizer, "add_bos_token", None),
            "add_eos_token": getattr(tokenizer, "add_eos_token", None)}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = getattr(tokenizer, name, None)
    return info
