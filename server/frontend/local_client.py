"""The engine client for one process: the verbs of :class:`~server.frontend.client.EngineClient`
(``check_fits``, ``check_structured``, ``submit``, ``cancel``) over an :class:`~server.engine.engine.Engine`
stepped by the caller's own thread, for training's evaluation, the in-process benchmarks
(:mod:`server.bench.offline`, :mod:`server.bench.sweep`) and offline use.

Requests are the same :class:`~server.frontend.request_state.RequestState` s, followed by the same
:class:`~server.frontend.tracker.RequestTracker` from the same step outputs the engine process would send
(:class:`~server.engine.step_events.StepEvents`), so text, stop strings and finishes behave exactly as
when served; only the transport differs (no sockets, no admission queue limit, no deadlines).
"""

from __future__ import annotations

from server.engine.engine import Engine, EngineConfig, RequestInvalid
from server.engine.grammar import InvalidGrammar
from server.engine.model import BaseModel
from server.engine.sequence import Sequence
from server.engine.step_events import StepEvents
from server.frontend.request_state import RequestObserver, RequestState
from server.frontend.tracker import RequestTracker


class LocalEngineClient(RequestTracker):
    def __init__(self, base: BaseModel, config: EngineConfig | None = None,
                 observer: RequestObserver | None = None):
        config = config or EngineConfig()
        super().__init__(observer, config.max_batch_size, max_waiting=1 << 30)
        self.base = base
        self._events = StepEvents()
        self.engine = Engine(base, config, observer=self._events)

    @property
    def fit_limits(self) -> tuple[int, int]:
        return self.base.shape.max_positions, self.engine.max_slots

    async def check_structured(self, state: RequestState) -> None:
        """Raise :class:`RequestInvalid` when ``state``'s structured output cannot be followed."""
        if state.params.structured is not None:
            error = await self.check_grammar(*state.params.structured)
            if error is not None:
                raise RequestInvalid(error)

    async def check_grammar(self, kind: str, spec: str) -> str | None:
        """None when ``(kind, spec)`` compiles, else why not; in this process (offline use: no one else's
        requests to lose)."""
        try:
            self.engine.grammars.check((kind, spec))
        except InvalidGrammar as exc:
            return str(exc)
        return None

    def submit(self, state: RequestState) -> None:
        """Queue ``state`` (after :meth:`check_fits`; not checked again)."""
        self._register(state, self.base.tokenizer)
        seq = Sequence(state.prompt_ids, state.params.for_engine(), state.prefix, tenant=state.tenant,
                       id=state.id)
        self._events.track(seq)
        self.engine.enqueue(seq)

    def _abort(self, ids: list[int]) -> None:
        for seq_id in ids:
            seq = self._events.seqs.get(seq_id)
            if seq is not None:
                self.engine.cancel(seq)

    def step(self) -> int:
        """One engine step, its outputs applied to the requests; returns the tokens the engine produced."""
        produced = self.engine.step()
        self._apply(self._events.take(self.engine))
        return produced

    def run_until_idle(self) -> None:
        """Step until every submitted request has finished."""
        while self._states:
            self.step()
            if self._states and not (self.engine.num_running or self.engine.num_waiting):
                raise RuntimeError(f"the engine lost {len(self._states)} requests")  # a bug, if ever
