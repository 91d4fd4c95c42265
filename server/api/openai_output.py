"""What the OpenAI-compatible routes return, from each choice's request state and its stream of
:class:`~server.api.streaming.Piece` s: usage, logprobs in OpenAI's shapes, and the streamed chunks of
``/v1/completions`` and ``/v1/chat/completions``. Text comes from each request's one detokenizer
(:mod:`server.frontend.detokenizer`), the token strings of logprobs from its :func:`token_text`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.api.streaming import Piece
from server.api.tool_calls import CallParser
from server.api.tools import ToolChoice
from server.frontend.detokenizer import token_text
from server.frontend.request_state import RequestState


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass(slots=True)
class Prompt:
    ids: list[int]
    text: str  # what ``echo`` returns


class Logprobs:
    """OpenAI's logprobs shapes from the engine's plain (logprob, [(id, logprob)...]) entries."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return token_text(self._tokenizer, token_id)

    def completion(self, ids: list[int], entries: list, offset: int) -> dict:
        """/v1/completions: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the chosen token included, as
        OpenAI does) and ``text_offset`` (characters from the start of the choice's text)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(ids, entries):
            token = self.token(token_id)
            out["tokens"].append(token)
            out["text_offset"].append(offset)
            offset += len(token)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            logprob, top = entry
            out["token_logprobs"].append(logprob)
            tops = {self.token(t): lp for t, lp in top}
            tops.setdefault(token, logprob)
            out["top_logprobs"].append(tops)
        return out

    def chat(self, ids: list[int], entries: list) -> list[dict]:
        """/v1/chat/completions: ``logprobs.content``, one entry per generated token."""
        def item(token_id: int, logprob: float) -> dict:
            token = self.token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        return [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                for t, (lp, top) in zip(ids, entries)]




def whole_choices(seqs: list[RequestState], prompts: list[Prompt], n: int, fmt: Logprobs, *, chat: bool,
                  logprobs: int | None, echo: bool, tools: ToolChoice) -> list[dict]:
    """The ``choices`` of a whole (not streamed) reply: choice ``i`` is sample ``i % n`` of prompt
    ``i // n``."""
    choices: list[dict] = []
    for i, seq in enumerate(seqs):
        assert seq.finish_reason is not None, "run_to_end returns finished sequences"
        text = seq.text
        finish_reason = seq.finish_reason.value
        choice: dict[str, object]
        if chat:
            message = {"role": "assistant", "content": text}
            if tools.active:
                message, finish_reason = CallParser(tools).message(text, finish_reason)
            choice = {"message": message,
                      "logprobs": None if logprobs is None else
                      {"content": fmt.chat(seq.output_ids, seq.output_logprobs)}}
        else:
            prompt = prompts[i // n]
            choice = {"text": prompt.text + text if echo else text,
                      "logprobs": None if logprobs is None else
                      choice_logprobs(fmt, seq, prompt, echo, seq.output_ids, seq.output_logprobs,
                                      len(prompt.text) if echo else 0)}
        choices.append({"index": i, **choice, "finish_reason": finish_reason})
    return choices


def choice_logprobs(fmt: Logprobs, seq: RequestState, prompt: Prompt, echo: bool, ids: list[int],
                     entries: list, offset: int) -> dict:
    """A completion choice's logprobs: the prompt's first (with ``echo``), then ``ids``' (generated)."""
    generated = fmt.completion(ids, entries, offset)
    if not echo:
        return generated
    scored = fmt.completion(prompt.ids, seq.prompt_logprobs, 0)
    return {key: scored[key] + generated[key] for key in scored}


async def completion_chunks(pieces: AsyncIterator[Piece], head: dict, seqs: list[RequestState],
                             prompts: list[Prompt], n: int, usage, include_usage: bool, fmt: Logprobs,
                             echo: bool) -> AsyncIterator[dict]:
    head = {**head, "object": "text_completion"}
    completion_tokens = 0
    offsets: dict[int, int] = {}  # choice -> characters of its text sent so far (text_offset)
    async for piece in pieces:
        completion_tokens += len(piece.token_ids)
        seq, prompt = seqs[piece.index], prompts[piece.index // n]
        text, first = piece.text, piece.index not in offsets
        logprobs = None
        if first and echo:  # the prompt (and its scores) goes out with the choice's first chunk
            offsets[piece.index] = len(prompt.text)
            text = prompt.text + text
        offsets.setdefault(piece.index, 0)
        if piece.logprobs is not None and (piece.token_ids or (first and echo)):
            logprobs = (choice_logprobs(fmt, seq, prompt, echo and first, piece.token_ids, piece.logprobs,
                                         offsets[piece.index]) if first and echo else
                        fmt.completion(piece.token_ids, piece.logprobs, offsets[piece.index]))
        offsets[piece.index] += len(piece.text)
        if text or piece.finish_reason or logprobs:
            yield {**head, "choices": [{"index": piece.index, "text": text, "logprobs": logprobs,
                                        "finish_reason": piece.finish_reason}]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(completion_tokens)}


async def chat_chunks(pieces: AsyncIterator[Piece], head: dict, n: int, usage, include_usage: bool,
                       fmt: Logprobs, tools: ToolChoice) -> AsyncIterator[dict]:
    """Text as ``content`` deltas; with tools, each complete call as one ``tool_calls`` delta (its id, name
    and whole arguments) and then ``finish_reason`` ``tool_calls``."""
    head = {**head, "object": "chat.completion.chunk"}
    parsers = [CallParser(tools) for _ in range(n)]

    def chunk(index: int, delta: dict, finish_reason: str | None = None,
              logprobs: dict | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    completion_tokens = 0
    async for piece in pieces:
        completion_tokens += len(piece.token_ids)
        logprobs = None
        if piece.logprobs is not None and piece.token_ids:
            logprobs = {"content": fmt.chat(piece.token_ids, piece.logprobs)}
        parser = parsers[piece.index]
        deltas = parser.feed(piece.text) if tools.active else [{"content": piece.text}] * bool(piece.text)
        if piece.finish_reason and tools.active:
            deltas += parser.finish()
        if logprobs and not deltas:  # the scores of tokens whose text is not out yet
            deltas = [{}] if tools.active else [{"content": ""}]
        for k, delta in enumerate(deltas):
            yield chunk(piece.index, delta, logprobs=logprobs if k == 0 else None)
        if piece.finish_reason:
            yield chunk(piece.index, {}, parser.finish_reason(piece.finish_reason))
    if include_usage:
        yield {**head, "choices": [], "usage": usage(completion_tokens)}
