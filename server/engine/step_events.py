"""What one engine step produced, gathered into one :class:`~server.engine.protocol.StepOutput`: token ids,
logprobs, admissions, finishes and counts, never text.

The engine process sends it over its socket (:mod:`server.engine.core`); the in-process client applies it
directly (:mod:`server.frontend.local_client`). Both then follow their requests the same way
(:class:`~server.frontend.tracker.RequestTracker`).
"""

from __future__ import annotations

import time

from server.engine import protocol
from server.engine.engine import Engine, EngineObserver
from server.engine.sequence import FinishReason, Sequence


class StepEvents(EngineObserver):
    """The engine's observer: collects what it reports during a step until :meth:`take`."""

    def __init__(self) -> None:
        self.out = protocol.StepOutput(time=0.0)
        self.seqs: dict[int, Sequence] = {}  # every tracked sequence not yet finished, by id (for aborts)

    def track(self, seq: Sequence) -> None:
        """Follow ``seq`` until it finishes (so that an abort finds it by id)."""
        self.seqs[seq.id] = seq

    def reject(self, seq_id: int, message: str) -> None:
        """``seq_id`` failed before it was queued."""
        self.out.finished.append(protocol.Finished(seq_id, FinishReason.ERROR.value, message))

    def take(self, engine: Engine) -> protocol.StepOutput:
        """What was reported since the last call, with ``engine``'s counts after it."""
        out, self.out = self.out, protocol.StepOutput(time=0.0)
        out.running, out.waiting = engine.num_running, engine.num_waiting
        if not out.empty or out.decoded or out.running or out.waiting:
            out.time = out.time or time.monotonic()
            blocks = engine.blocks
            out.kv = protocol.KvStats(blocks.usage, blocks.cache_queries, blocks.cache_hits,
                                      blocks.preemptions)
        return out

    # -- EngineObserver --------------------------------------------------------------------------------------

    def admitted(self, seqs: list[Sequence], now: float) -> None:
        self.out.admitted.extend(seq.id for seq in seqs)

    def prefilled(self, seq: Sequence, tokens: int) -> None:
        self.out.prefilled.append((seq.id, tokens))
        if seq.num_cached_tokens:
            self.out.cached.append((seq.id, seq.num_cached_tokens))

    def decoded(self, batch_size: int) -> None:
        self.out.decoded = batch_size

    def prompt_logprobs(self, seq: Sequence, entries: list[protocol.Logprob]) -> None:
        self.out.prompt_logprobs.append(protocol.PromptLogprobs(seq.id, entries))

    def token(self, seq: Sequence, token: int, logprobs: protocol.Logprob | None, now: float) -> None:
        self.out.time = now
        self.out.tokens.append(protocol.NewToken(seq.id, token, logprobs))

    def finished(self, seq: Sequence, reason: FinishReason, error: str | None, now: float) -> None:
        self.out.finished.append(protocol.Finished(seq.id, reason.value, error))
        self.seqs.pop(seq.id, None)
