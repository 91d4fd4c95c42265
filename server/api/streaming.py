"""Running one request's sequences on the engine and following them from the event loop, whole or as a
stream of Server-Sent Events. Shared by ``/generate`` and the OpenAI-compatible routes.

The engine (in its own process; see :mod:`server.frontend.client`) only *signals* progress: an
``asyncio.Event`` per request, set as its outputs arrive. Each sequence's text comes from its one detokenizer
(:mod:`server.frontend.detokenizer`), read on the event loop: streams take what it may show so far, whole
replies its text at the end. A slow client never slows the batch, and tokens that arrive faster than the
client reads are coalesced into one chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import cast

from fastapi import Request
from starlette.responses import StreamingResponse

from server.api.errors import error_body
from server.auth import Principal
from server.engine.engine import RequestInvalid
from server.engine.sequence import FinishReason
from server.errors import RETRY_AFTER_S, GenerationFailed, GenerationUnavailable
from server.frontend.admission import EngineOverloaded, EngineUnavailable
from server.frontend.request_state import RequestState
from server.state import ServerState

DISCONNECT_POLL_S = 0.25
_FAILED = (FinishReason.ERROR, FinishReason.TIMEOUT)


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
    seqs: list[RequestState]
    stream: bool = False  # wake on every token (streaming) or only when a sequence finishes
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self):
        loop = asyncio.get_running_loop()

        def notify() -> None:  # runs on the loop, as the engine client applies a step's outputs
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
        except RequestInvalid:  # a 400 (server/api/errors.py), before anything was queued
            self.state.metrics.rejected(self.seqs[0].tenant, "rejected")
            raise
        try:
            engine.check_admission(len(self.seqs), self.seqs[0].tenant)
            for seq in self.seqs:
                engine.submit(seq)
        except (EngineUnavailable, EngineOverloaded):  # 503s (server/api/errors.py)
            self.cancel_nowait()
            self.state.metrics.rejected(self.seqs[0].tenant, "overloaded")
            raise

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
            message = failed.error or "generation failed"
            if failed.unavailable:
                # the engine's own estimate for a request it lost (a replacement's start-up, or None: never)
                raise GenerationUnavailable(message, self.state.engine.retry_after)
            if failed.finish_reason is FinishReason.TIMEOUT:
                raise GenerationUnavailable(message, RETRY_AFTER_S)
            raise GenerationFailed(message)

    async def wait(self, request: Request) -> list[RequestState]:
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
        self.check_errors()  # a failed sequence fails the request (its status: server/api/errors.py)
        return self.seqs

    async def pieces(self) -> AsyncIterator[Piece]:
        """Each sequence's new text and ids as they come; :class:`GenerationFailed` if the engine fails."""
        seen = [0] * len(self.seqs)
        pending = list(range(len(self.seqs)))
        while pending:
            await self._next_change()
            for i in list(pending):
                seq = self.seqs[i]
                ids = seq.output_ids[seen[i]:]
                # the client adds a token's logprob before its id, so these are all there
                logprobs = (None if seq.params.logprobs is None
                            else seq.output_logprobs[seen[i]: seen[i] + len(ids)])
                seen[i] += len(ids)
                assert seq.detokenizer is not None, "set when submitted"
                text = seq.detokenizer.read()  # once finished: all the rest
                if seq.finished:
                    assert seq.finish_reason is not None, "finished means it has its reason"
                    self.check_errors()
                    pending.remove(i)
                    yield Piece(i, text, ids, seq.finish_reason.value, logprobs)
                elif ids:
                    yield Piece(i, text, ids, logprobs=logprobs)


async def run_to_end(state: ServerState, principal: Principal, request: Request,
                     seqs: list[RequestState]) -> list[RequestState]:
    """Run ``seqs`` holding one of the tenant's concurrency slots; return them finished."""
    async with state.limiter.slot(principal):
        generation = Generation(state, seqs)
        await generation.submit()
        return await generation.wait(request)


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"




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
        except GenerationFailed as exc:  # the 200 is already sent: report it in the stream, as OpenAI does
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


async def open_stream(state: ServerState, principal: Principal, seqs: list[RequestState],
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
