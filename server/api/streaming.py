"""Running one request's sequences on the engine and following them from the event loop, whole or as a
stream of Server-Sent Events. Shared by ``/generate`` and the OpenAI-compatible routes.

The engine (in its own process; see :mod:`server.engine.client`) only *signals* progress: an ``asyncio.Event``
per request, set as its outputs arrive. All reading of token ids and all detokenization happen on the event
loop, so a slow client never slows the batch and tokens that arrive faster than the client reads are
coalesced into one chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import cast

from fastapi import HTTPException, Request
from starlette.responses import StreamingResponse

from server.auth import Principal
from server.engine.client import EngineOverloaded, EngineUnavailable
from server.engine.engine import RequestInvalid
from server.engine.sequence import FinishReason, Sequence
from server.errors import RETRY_AFTER_S
from server.state import ServerState

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
_FAILED = (FinishReason.ERROR, FinishReason.TIMEOUT)
REPLACEMENT_CHAR = "\ufffd"  # what a token ending inside a multi-byte UTF-8 character decodes to




class GenerationError(RuntimeError):
    """The engine failed a sequence: an internal error (500), or it could not serve it at all (the engine
    process is gone, the server is draining, the request's deadline passed in the queue: 503, retry)."""

    def __init__(self, message: str, retry: bool = False, retry_after: int | None = RETRY_AFTER_S):
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after  # None: a 503 without Retry-After (the engine is down for good)

    def as_http(self) -> HTTPException:
        if self.retry:
            return HTTPException(503, str(self), headers=_retry_headers(self.retry_after))
        return HTTPException(500, str(self))


def _retry_headers(retry_after: int | None) -> dict[str, str] | None:
    return {"Retry-After": str(retry_after)} if retry_after is not None else None


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas that are safe to show.

    Decodes a short window instead of the whole output each time (the vLLM scheme): the text of
    ``ids[prefix:read]`` is already emitted, so the new text is ``decode(ids[prefix:])`` minus it; decoding
    from a few tokens back keeps tokenizers that drop a leading space at a window start correct. Two things
    are held back: text ending in a replacement char (a multi-byte character split across tokens), and, with
    stop strings, the last ``len(longest stop) - 1`` characters plus anything from a complete stop string on,
    since the engine cuts the final text there. :meth:`finish` releases the rest from the engine's final text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # decoded so far, whole characters only
        self._sent = 0  # characters of ``_text`` returned so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        """Take new token ids; return the text that may be shown now (possibly empty)."""
        if ids:
            self._ids.extend(ids)
            before = self._decode(self._ids[self._prefix_offset:self._read_offset])
            after = self._decode(self._ids[self._prefix_offset:])
            if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
                self._text += after[len(before):]
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        safe = len(self._text) - self._hold
        # A stop string can only start after what was sent (everything sent was checked the same way).
        search_from = max(0, self._sent - self._hold)
        for stop in self._stop:
            at = self._text.find(stop, search_from)
            if at >= 0:
                safe = min(safe, at)
        return self._take(safe)

    def finish(self, final_text: str) -> str:
        """The rest, once the engine has finished: ``final_text`` (``seq.text``, cut at a stop string) is
        authoritative."""
        if not final_text.startswith(self._text[:self._sent]):  # cannot happen for byte-level BPE tokenizers
            log.warning("streamed text diverged from the final text; the stream differs from a whole reply")
        rest = final_text[self._sent:]
        self._sent = len(final_text)
        return rest

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece = self._text[self._sent:end]
        self._sent = end
        return piece


@dataclass(slots=True)
class Piece:
    """New output of one sequence: ``index`` in the request, text to show, the new token ids."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the sequence's last piece
    logprobs: list | None = None  # the engine's entries for ``token_ids`` when the request asked for them


@dataclass(eq=False)
class Generation:
    """One request's sequences (its ``n`` choices) in the engine, followed from the event loop."""

    state: ServerState
    seqs: list[Sequence]
    stream: bool = False  # wake on every token (streaming) or only when a sequence finishes
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self):
        loop = asyncio.get_running_loop()

        def notify(_: Sequence) -> None:  # runs on the loop, as the engine client applies a step's outputs
            try:
                loop.call_soon_threadsafe(self._changed.set)
            except RuntimeError:  # the loop is closed: the server is shutting down, nobody is listening
                pass

        for seq in self.seqs:
            seq.on_finish = notify
            if self.stream:
                seq.on_token = notify

    @property
    def done(self) -> bool:
        return all(seq.finished for seq in self.seqs)

    async def submit(self) -> None:
        """Queue every sequence, or none: a request that can never fit is a 400 before anything runs."""
        engine = self.state.engine
        try:
            for seq in self.seqs:
                engine.check_fits(seq)
            for structured in {seq.params.structured for seq in self.seqs}:  # one check per distinct grammar
                await engine.check_structured(next(s for s in self.seqs if s.params.structured == structured))
        except RequestInvalid as exc:
            self.state.metrics.rejected(self.seqs[0].tenant, "rejected")
            raise HTTPException(400, str(exc)) from None
        try:
            engine.check_admission(len(self.seqs), self.seqs[0].tenant)
            for seq in self.seqs:
                engine.submit(seq)
        except (EngineUnavailable, EngineOverloaded) as exc:
            self.cancel_nowait()
            self.state.metrics.rejected(self.seqs[0].tenant, "overloaded")
            retry_after = exc.retry_after if isinstance(exc, EngineUnavailable) else RETRY_AFTER_S
            raise HTTPException(503, str(exc), headers=_retry_headers(retry_after)) from None

    async def _next_change(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    def cancel_nowait(self) -> None:
        for seq in self.seqs:
            if not seq.finished:
                self.state.engine.cancel(seq)

    async def cancel(self) -> None:
        """Cancel what still runs and wait for the engine to confirm (at its next step): its slots are free
        once this returns."""
        self.cancel_nowait()
        while not self.done:
            await self._next_change()

    def check_errors(self) -> None:
        failed = next((seq for seq in self.seqs if seq.finish_reason in _FAILED), None)
        if failed is not None:
            retry = failed.unavailable or failed.finish_reason is FinishReason.TIMEOUT
            # the engine's own estimate for a request it lost (a replacement's start-up, or None: never)
            retry_after = self.state.engine.retry_after if failed.unavailable else RETRY_AFTER_S
            raise GenerationError(failed.error or "generation failed", retry=retry, retry_after=retry_after)

    async def wait(self, request: Request) -> list[Sequence]:
        """Until every sequence has finished. A client that goes away cancels them, freeing their slots."""
        try:
            while not self.done:
                try:
                    await asyncio.wait_for(self._next_change(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        await self.cancel()
        except asyncio.CancelledError:
            self.cancel_nowait()
            raise
        try:
            self.check_errors()
        except GenerationError as exc:
            raise exc.as_http() from None
        return self.seqs

    async def pieces(self) -> AsyncIterator[Piece]:
        """Each sequence's new text and ids as they come; :class:`GenerationError` if the engine fails."""
        tokenizer = self.state.base.tokenizer
        detokenizers = [IncrementalDetokenizer(tokenizer, seq.params.stop) for seq in self.seqs]
        seen = [0] * len(self.seqs)
        pending = list(range(len(self.seqs)))
        while pending:
            await self._next_change()
            for i in list(pending):
                seq = self.seqs[i]
                finished = seq.finished  # read first: once finished, every id is already in output_ids
                ids = seq.output_ids[seen[i]:]
                # the engine appends a token's logprob before its id, so these are all there
                logprobs = (None if seq.params.logprobs is None
                            else seq.output_logprobs[seen[i]: seen[i] + len(ids)])
                seen[i] += len(ids)
                text = detokenizers[i].add(ids)
                if finished:
                    assert seq.finish_reason is not None, "finished means it has its reason"
                    self.check_errors()
                    pending.remove(i)
                    text += detokenizers[i].finish(seq.text or "")
                    yield Piece(i, text, ids, seq.finish_reason.value, logprobs)
                elif ids:
                    yield Piece(i, text, ids, logprobs=logprobs)


async def run_to_end(state: ServerState, principal: Principal, request: Request,
                     seqs: list[Sequence]) -> list[Sequence]:
    """Run ``seqs`` holding one of the tenant's concurrency slots; return them finished."""
    async with state.limiter.slot(principal):
        generation = Generation(state, seqs)
        await generation.submit()
        return await generation.wait(request)


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def error_body(message: str, type_: str = "server_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape (also used for errors inside any stream, where the status is already sent)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class EventStream(StreamingResponse):
    """An SSE response that owns its generation: however the response ends (done, client gone, server
    error), unfinished sequences are cancelled and ``release`` runs (giving back the concurrency slot).

    The cleanup lives in ``__call__`` rather than in the body generator because on a disconnect Starlette
    cancels the send loop and may leave the generator suspended, to be closed only by garbage collection.
    """

    def __init__(self, chunks: AsyncIterator[dict], generation: Generation, release: Callable):
        super().__init__(self._encode(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._generation = generation
        self._release = release

    @staticmethod
    async def _encode(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except GenerationError as exc:  # the 200 is already sent: report it in the stream, as OpenAI does
            yield sse(error_body(str(exc)))
        yield SSE_DONE

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                # the body is the async generator _encode made (Starlette types it as any async iterable)
                await cast(AsyncGenerator[bytes, None], self.body_iterator).aclose()
                await self._generation.cancel()
            finally:
                await self._release()


async def open_stream(state: ServerState, principal: Principal, seqs: list[Sequence],
                      render: Callable[[AsyncIterator[Piece]], AsyncIterator[dict]]) -> EventStream:
    """Take a concurrency slot, submit ``seqs`` and return the response streaming ``render(pieces)``.

    Refusals (429, a request too long for the context) happen here, while a status code can still say so;
    from then on the slot is held until the stream ends.
    """
    slot = AsyncExitStack()
    await slot.enter_async_context(state.limiter.slot(principal))
    try:
        generation = Generation(state, seqs, stream=True)
        await generation.submit()
    except BaseException:
        await slot.aclose()
        raise
    return EventStream(render(generation.pieces()), generation, slot.aclose)
