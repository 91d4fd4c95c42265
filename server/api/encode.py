"""Prompt text to token ids: size-checked first, then tokenized off the event loop.

Tokenizing is the HTTP process's heaviest per-request work (a 10 MB prompt takes seconds). It runs on one
dedicated thread, so the event loop keeps answering (health checks, other streams) meanwhile, and a burst of
prompts cannot take more than one core from the engine process. Before any of that, a prompt's size in
bytes is checked against what the model's context could ever hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import HTTPException

from server.state import ServerState

# A token is rarely more than a few bytes of text; 64 per position leaves room for long runs of whitespace
# or symbols that merge into one token, and still refuses a prompt that could never fit long before it is
# tokenized.
BYTES_PER_POSITION = 64

_tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
T = TypeVar("T")


def max_prompt_bytes(state: ServerState) -> int:
    return state.base.shape.max_positions * BYTES_PER_POSITION


def check_text(state: ServerState, text: str, param: str = "prompt") -> None:
    """400 for text that is too large to be a prompt for this model, or that is not valid Unicode."""
    limit = max_prompt_bytes(state)
    if len(text) > limit:  # characters are at least one byte each: no need to encode to know
        raise HTTPException(
            400,
            f"{param} is {len(text)} characters, more than this model's context of "
            f"{state.base.shape.max_positions} tokens could hold (at most {limit} bytes): "
            "shorten it.",
        )
    try:
        size = len(text.encode("utf-8"))
    except (
        UnicodeEncodeError
    ) as exc:  # a lone surrogate such as "\ud800", which JSON allows and UTF-8 does not
        raise HTTPException(
            400,
            f"{param} holds {text[exc.start : exc.end]!a} at character {exc.start}, a lone "
            "UTF-16 surrogate that is not a Unicode character: send valid text.",
        ) from None
    if size > limit:
        raise HTTPException(
            400,
            f"{param} is {size} bytes, more than this model's context of "
            f"{state.base.shape.max_positions} tokens could hold (at most {limit} bytes): "
            "shorten it.",
        )


async def on_tokenizer_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` (a tokenizer call) on the tokenizer thread and wait for it without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(_tokenizer_thread, lambda: fn(*args, **kwargs))


async def encode_prompt(state: ServerState, text: str, param: str = "prompt") -> list[int]:
    """``tokenizer(text)``'s input ids (no chat template), after :func:`check_text`."""
    check_text(state, text, param)
    encoded = await on_tokenizer_thread(state.base.tokenizer, text)
    return list(encoded["input_ids"])
