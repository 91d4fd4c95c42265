"""A request as the HTTP process follows it: what it asked, and what it streams and returns (no more).

The engine process keeps its own :class:`~server.engine.sequence.Sequence` (cache positions, sampling
state, what the scheduler needs); this is the front end's side, filled from the engine's step outputs by
:class:`~server.frontend.client.EngineClient`: the token ids and logprobs received, the text made from them
once by its :class:`~server.frontend.detokenizer.Detokenizer`, how it finished, and the numbers the usage and
the metrics report. Nothing here is sent back or kept in step with the engine's copy.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.sequence import FinishReason, SamplingParams, TaskPrefix
from server.frontend.detokenizer import Detokenizer

_ids = itertools.count()

Logprob = tuple[float, list[tuple[int, float]]]  # a token's logprob and its top alternatives (id, logprob)


@dataclass(eq=False, slots=True)
class RequestState:
    """One sequence of a request (one of its ``n`` choices)."""

    prompt_ids: list[int]
    params: SamplingParams
    prefix: TaskPrefix | None = None
    tenant: str = "default"  # whose queue it waits in (fair scheduling) and whose metrics it counts in
    deadline: float | None = None  # time.monotonic() by which it must have joined the batch
    id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)  # CLOCK_MONOTONIC: shared by all processes
    detokenizer: Detokenizer | None = None  # set when submitted (it needs the served model's tokenizer)
    on_token: Callable[[], None] | None = None  # called on the event loop after new tokens (streaming)
    on_finish: Callable[[], None] | None = None  # called on the event loop once it has finished
    # as returned, through a stop string's last token; the engine keeps its own ids (its next inputs, what a
    # preempted request recomputes), this copy is detokenized and returned
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Logprob] = field(default_factory=list)  # one per output id, when asked for
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)  # with echo: the first is None
    num_cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache (usage), as it sent them
    admit_time: float | None = None  # when it joined the batch (the engine's clock)
    last_token_time: float | None = None  # the engine's time of its latest token (metrics: TTFT, ITL)
    finish_reason: FinishReason | None = None
    error: str | None = None
    unavailable: bool = False  # failed because the engine is gone or shutting down: retry later (503)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    @property
    def num_prefix_kv(self) -> int:
        """Virtual tokens the task's key/values take (prefix-tuning): positions never computed."""
        return self.num_virtual_tokens if self.prefix is not None and self.prefix.kind.is_deep else 0

    @property
    def text(self) -> str:
        """The output's text (all of it once finished), cut before a stop string."""
        return self.detokenizer.text if self.detokenizer is not None else ""


class RequestObserver:
    """Hooks for metrics, called on the event loop as the engine's step outputs arrive (the engine's
    timestamps); no-ops here."""

    def admitted(self, states: list[RequestState], now: float) -> None:
        """``states`` joined the batch (their queue time ends ``now``)."""

    def decoded(self, batch_size: int) -> None:
        """A step gave ``batch_size`` running rows their next token (prefill chunks are not counted)."""

    def token(self, state: RequestState, now: float) -> None:
        """``state`` got a token; ``state.last_token_time`` still holds the previous token's time."""

    def finished(self, state: RequestState, now: float) -> None:
        """``state`` left (``state.finish_reason`` says why)."""

    def prefilled(self, state: RequestState, tokens: int) -> None:
        """``tokens`` of ``state``'s prompt were computed in a step (recomputation counts again)."""

    def cache_stats(self, usage: float, queries: int, hits: int, preemptions: int) -> None:
        """The key/value cache after a step: the fraction of blocks in use, and the prefix-cache queries and
        hits (tokens) and preemptions since the last call."""
