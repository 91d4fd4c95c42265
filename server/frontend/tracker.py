"""Following requests from the engine's step outputs, for both clients of the engine (HTTP process side).

:class:`RequestTracker` holds every unfinished request's :class:`~server.frontend.request_state.RequestState`
and applies each :class:`~server.engine.protocol.StepOutput` to them: admission, prompt logprobs, token ids
and logprobs (fed to the request's detokenizer, which looks for stop strings: a hit finishes the request
here at once and aborts the engine's copy), finishes; then it calls the requests' ``on_token`` /
``on_finish`` callbacks. The two transports differ only in how outputs arrive and aborts leave: over the
engine process's sockets (:class:`~server.frontend.client.EngineClient`) or from an engine in this process
(:class:`~server.frontend.local_client.LocalEngineClient`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from server.engine import protocol
from server.engine.engine import check_fits
from server.engine.sequence import FinishReason
from server.frontend.admission import WaitingQueue
from server.frontend.detokenizer import Detokenizer
from server.frontend.request_state import RequestObserver, RequestState

log = logging.getLogger(__name__)


class RequestTracker:
    """The verbs and the bookkeeping both engine clients share; a transport provides :meth:`_abort` and the
    limits :meth:`check_fits` checks against."""

    def __init__(self, observer: RequestObserver | None, max_batch_size: int, max_waiting: int):
        self.observer = observer or RequestObserver()
        self.num_running = 0  # as of the engine's last step
        self._waiting = WaitingQueue(max_batch_size, max_waiting)  # submitted, not in the batch yet
        self._states: dict[int, RequestState] = {}  # every unfinished request, by id
        self._timers: dict[int, asyncio.TimerHandle] = {}  # deadlines of those waiting for the batch
        self._kv_totals = [0, 0, 0]  # the engine's cumulative prefix-cache queries, hits, preemptions

    # -- what a transport provides ---------------------------------------------------------------------------

    @property
    def fit_limits(self) -> tuple[int, int]:
        """The engine's (max_positions, max_slots)."""
        raise NotImplementedError

    def _abort(self, ids: list[int]) -> None:
        raise NotImplementedError

    # -- the shared verbs ------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests submitted here that have not joined the batch."""
        return self._waiting.num_waiting

    @property
    def num_in_flight(self) -> int:
        return len(self._states)

    def check_fits(self, state: RequestState) -> None:
        """Raise :class:`RequestInvalid` for a request the engine could never serve (too long). Checked here
        only, before submission: the engine queues what it is sent."""
        check_fits(len(state.prompt_ids), state.prefix, state.params.max_new_tokens, *self.fit_limits)

    def cancel(self, state: RequestState) -> None:
        """Stop ``state``: the engine finishes it as cancelled at its next step (``on_finish`` runs then)."""
        if state.id in self._states:
            self._abort([state.id])

    def _register(self, state: RequestState, tokenizer) -> None:
        """Follow ``state`` from now on, with its own detokenizer."""
        params = state.params
        state.detokenizer = Detokenizer(tokenizer, params.stop, params.stop_token_ids, params.min_tokens)
        if params.prompt_logprobs is not None:  # nothing predicts the first prompt token: no engine entry
            state.prompt_logprobs.append(None)
        self._states[state.id] = state
        self._count_waiting(state, +1)

    # -- outputs ---------------------------------------------------------------------------------------------

    def _apply(self, out: protocol.StepOutput) -> None:
        now = out.time
        self.num_running = out.running
        admitted = [self._states[i] for i in out.admitted if i in self._states]
        for state in admitted:
            state.admit_time = now
            self._count_waiting(state, -1)
            timer = self._timers.pop(state.id, None)
            if timer is not None:
                timer.cancel()
        if admitted:
            self.observer.admitted(admitted, now)
        if out.decoded:
            self.observer.decoded(out.decoded)
        self._apply_cache(out)
        for scored in out.prompt_logprobs:
            if (scoring := self._states.get(scored.id)) is not None:
                scoring.prompt_logprobs.extend(scored.entries)
        self._apply_tokens(out.tokens, now)
        for done in out.finished:
            if (finished := self._states.get(done.id)) is not None:
                self._finish(finished, FinishReason(done.reason), done.error)

    def _apply_tokens(self, tokens: list[protocol.NewToken], now: float) -> None:
        touched = []
        for new in tokens:
            state = self._states.get(new.id)
            if state is None:
                continue  # finished here already (stop string, deadline): the engine's extra token is dropped
            self.observer.token(state, now)
            state.last_token_time = now
            if new.logprobs is not None:  # before the id: whoever sees the id sees its logprob
                state.output_logprobs.append(new.logprobs)
            state.output_ids.append(new.token)
            assert state.detokenizer is not None, "set when submitted"
            if state.detokenizer.feed((new.token,)):  # a stop string: done here, the engine's copy aborted
                self._abort([state.id])
                self._finish(state, FinishReason.STOP)
            else:
                touched.append(state)
        for state in touched:
            if state.on_token is not None and not state.finished:
                _call(state.on_token, state)

    def _apply_cache(self, out: protocol.StepOutput) -> None:
        for seq_id, tokens in out.cached:
            if (state := self._states.get(seq_id)) is not None:
                state.num_cached_tokens = tokens
        for seq_id, tokens in out.prefilled:
            if (state := self._states.get(seq_id)) is not None:
                self.observer.prefilled(state, tokens)
        if out.kv is not None:
            totals = [out.kv.queries, out.kv.hits, out.kv.preemptions]
            # a new engine process counts from 0 again
            deltas = [t - last if t >= last else t for t, last in zip(totals, self._kv_totals)]
            self._kv_totals = totals
            self.observer.cache_stats(out.kv.usage, *deltas)

    def _finish(
        self, state: RequestState, reason: FinishReason, error: str | None = None, unavailable: bool = False
    ) -> None:
        if self._states.pop(state.id, None) is None:
            return
        if state.admit_time is None:
            self._count_waiting(state, -1)
        timer = self._timers.pop(state.id, None)
        if timer is not None:
            timer.cancel()
        if state.detokenizer is not None:
            state.detokenizer.close()
        state.finish_reason, state.error, state.unavailable = reason, error, unavailable
        self.observer.finished(state, time.monotonic())
        if state.on_finish is not None:
            _call(state.on_finish, state)

    def _count_waiting(self, state, delta: int) -> None:
        self._waiting.count(state.tenant, delta)

    def _fail_all(self, message: str) -> None:
        for state in list(self._states.values()):
            self._finish(state, FinishReason.ERROR, message, unavailable=True)


def _call(callback: Callable[[], None], state: RequestState) -> None:
    try:
        callback()
    except Exception:  # a broken callback must not stop the outputs of everyone else
        log.exception("callback %s failed for request %s", callback, state.id)
