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
    """The engine's observer: collects what it reports during a step (and, through each tracked sequence's
    callbacks, its new tokens) until :meth:`take`."""

    def __init__(self) -> None:
        self.out = protocol.StepOutput(time=0.0)
        self.seqs: dict[int, Sequence] = {}  # every tracked sequence not yet finished, by id
        self._prompt_sent: dict[int, int] = {}  # id -> prompt log-probability entries already taken

    def track(self, seq: Sequence) -> None:
        """Report ``seq``'s tokens and finish from now on."""
        self.seqs[seq.id] = seq
        seq.on_finish, seq.on_token = self._forget, self._token

    def reject(self, seq_id: int, message: str) -> None:
        """``seq_id`` failed before it was queued."""
        self.out.finished.append(protocol.Finished(seq_id, FinishReason.ERROR.value, message))

    def take(self, engine: Engine) -> protocol.StepOutput:
        """What was reported since the last call, with ``engine``'s counts after it."""
        for seq in self.seqs.values():
            if seq.params.prompt_logprobs is not None:
                self._prompt_logprobs(seq)
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

    def token(self, seq: Sequence, now: float) -> None:
        self.out.time = now

    def finished(self, seq: Sequence, now: float) -> None:
        assert seq.finish_reason is not None, "called once it has finished"
        self.out.finished.append(protocol.Finished(seq.id, seq.finish_reason.value, seq.error))

    # -- the tracked sequences' callbacks --------------------------------------------------------------------

    def _token(self, seq: Sequence) -> None:
        """``seq`` got its next token in this step (the engine calls this once per row and step; a
        prompt-scoring row, which generates nothing, is called once at its end with no token)."""
        if not seq.output_ids:
            return
        logprobs = seq.output_logprobs[-1] if seq.params.logprobs is not None else None
        self.out.tokens.append(protocol.NewToken(seq.id, seq.output_ids[-1], logprobs))

    def _forget(self, seq: Sequence) -> None:
        if seq.params.prompt_logprobs is not None:  # a prompt-scoring row finishes in its last prefill step
            self._prompt_logprobs(seq)
            self._prompt_sent.pop(seq.id, None)
        self.seqs.pop(seq.id, None)

    def _prompt_logprobs(self, seq: Sequence) -> None:
        """Take the prompt log-probabilities ``seq`` gained since the last step (prefill goes chunk by
        chunk)."""
        sent = self._prompt_sent.get(seq.id, 0)
        if len(seq.prompt_logprobs) > sent:
            entries = seq.prompt_logprobs[sent:]
            self.out.prompt_logprobs.append(protocol.PromptLogprobs(seq.id, entries))
            self._prompt_sent[seq.id] = len(seq.prompt_logprobs)
