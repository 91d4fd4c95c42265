"""The serving loop: the scheduler picks who joins, the runner computes, the engine post-processes.

``step()`` runs one forward of at most ``max_step_tokens`` tokens: a next token for every running request,
and with the rest of the budget the prompts of requests that join now (a prompt longer than what is left
continues in the next steps: chunked prefill). Finished requests leave at once. So requests join and leave
between any two tokens (continuous batching), and a long prompt never stalls the running ones for more
than one bounded step.

One thread drives it: the engine process's main thread when serving (:mod:`server.engine.core`), the caller's
own in training and benchmarks (:meth:`run_until_idle`). It produces token ids (and logprobs) only: a request
ends at EOS, a stop id, its token budget, or when told to (:meth:`cancel`: a stop string the front end
found in the text, a client gone); text is never made here (:mod:`server.frontend.detokenizer`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from server.engine.block_manager import DEFAULT_BLOCK_SIZE, BlockManager
from server.engine.grammar import Grammars, InvalidGrammar
from server.engine.kv_cache import PagedKVCache
from server.engine.model import BaseModel
from server.engine.protocol import Logprob
from server.engine.runner import ModelRunner, PromptLogits
from server.engine.sampling import Sampler, SampleResult, token_logprobs
from server.engine.scheduler import Scheduler
from server.engine.sequence import FinishReason, Sequence, TaskPrefix

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_size: int = 32
    # Key/value memory of the block pool (blocks x block_size x bytes per token); bounds admission.
    kv_cache_bytes: int = 2 << 30
    # Tokens one forward may compute: one per running request, the rest for joining prompts. Larger steps
    # admit faster; smaller ones bound how long a joining prompt delays everyone's next token.
    max_step_tokens: int = 512
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_caching: bool = True  # reuse computed full blocks of identical prompt beginnings (per task)
    share_prefix_cache: bool = False  # across tenants too (cache timing then tells one tenant another's)
    # A prompt with more tokens than this to prefill gets at most this many of a step while others need the
    # budget; 0: half of max_step_tokens.
    long_prefill_threshold: int = 0
    max_long_prefills: int = 1  # long prompts prefilling at once

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(
                "max_step_tokens must be at least max_batch_size (a full batch decodes in one step)"
            )
        if self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.long_prefill_threshold < 0 or self.max_long_prefills < 1:
            raise ValueError("long_prefill_threshold must be >= 0 and max_long_prefills >= 1")

    @property
    def long_prefill_tokens(self) -> int:
        return self.long_prefill_threshold or max(1, self.max_step_tokens // 2)


class RequestInvalid(ValueError):
    """A request the engine can never serve as sent (a client error); the message says what to fix."""


class ContextTooLong(RequestInvalid):
    pass


def check_fits(prompt_tokens: int, prefix: TaskPrefix | None, max_new_tokens: int, max_positions: int,
               max_slots: int) -> None:
    """Raise :class:`ContextTooLong` for a request that can never be served: longer than the model's context
    (``max_positions``) or than the whole key/value budget (``max_slots`` token slots of the block pool,
    less the blocks its task's prefix takes)."""
    virtual = prefix.num_virtual_tokens if prefix is not None else 0
    total = prompt_tokens + virtual + max_new_tokens
    if total > max_positions:
        raise ContextTooLong(
            f"prompt ({prompt_tokens} tokens) + task prefix ({virtual} virtual tokens) + max_new_tokens "
            f"({max_new_tokens}) = {total} exceeds the model's context of {max_positions} positions; "
            "shorten the prompt or lower max_new_tokens."
        )
    if total + 2 * DEFAULT_BLOCK_SIZE > max_slots:  # partial blocks: its own last and its task's
        raise ContextTooLong(
            f"request needs {total} cache positions but the key/value budget holds "
            f"{max_slots}; lower max_new_tokens or raise --kv-cache-bytes."
        )
    if not prompt_tokens and not (prefix is not None and not prefix.kind.is_deep):
        raise ContextTooLong("the prompt is empty: send at least one token of prompt text.")


def check_grammar(grammars: Grammars, seq: Sequence) -> None:
    """Raise :class:`RequestInvalid` when ``seq`` asks for structured output that cannot be compiled."""
    if seq.params.structured is not None:
        try:
            grammars.check(seq.params.structured)  # compiles it and computes its first mask (milliseconds)
        except InvalidGrammar as exc:
            raise RequestInvalid(str(exc)) from None


class EngineObserver:
    """What the engine reports as it happens: admissions, tokens with their logprobs, prompt logprobs,
    finishes and counts (:class:`~server.engine.step_events.StepEvents` gathers them into the step's output).
    Every method runs on the engine thread, so each must be cheap; no-ops here."""

    def admitted(self, seqs: list[Sequence], now: float) -> None:
        """``seqs`` joined the batch (their queue time ends ``now``)."""

    def decoded(self, batch_size: int) -> None:
        """A step gave ``batch_size`` running rows their next token (prefill chunks are not counted)."""

    def token(self, seq: Sequence, token: int, logprobs: Logprob | None, now: float) -> None:
        """``seq`` got ``token`` (already in ``seq.output_ids``), with its logprobs when it asked for them."""

    def prompt_logprobs(self, seq: Sequence, entries: list[Logprob]) -> None:
        """The logprobs of ``seq``'s next prompt tokens (after those reported before; the first prompt token
        has none: nothing predicts it)."""

    def finished(self, seq: Sequence, reason: FinishReason, error: str | None, now: float) -> None:
        """``seq`` left, for ``reason`` (``error`` says what went wrong when it failed)."""

    def prefilled(self, seq: Sequence, tokens: int) -> None:
        """``tokens`` of ``seq``'s prompt were computed in this step (recomputation after a preemption
        counts again: it is computed again)."""

    def preempted(self, seq: Sequence) -> None:
        """``seq`` gave its blocks back to let older requests go on; it will be recomputed."""

    def cache_stats(self, usage: float, queries: int, hits: int, preemptions: int) -> None:
        """The key/value cache after a step: the fraction of blocks in use, and the prefix-cache queries and
        hits (tokens) and preemptions since the last call."""


class Engine:
    def __init__(self, base: BaseModel, config: EngineConfig = EngineConfig(),
                 observer: EngineObserver | None = None):
        self.base = base
        self.config = config
        shape = base.shape
        bytes_per_block = shape.kv_width * base.dtype.itemsize * config.block_size
        self.blocks = BlockManager(config.kv_cache_bytes // bytes_per_block, config.block_size,
                                   config.prefix_caching, config.share_prefix_cache, base.model_id)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_step_tokens,
                                   config.long_prefill_tokens, config.max_long_prefills)
        cache = PagedKVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, base.dtype, base.device,
                             self.blocks)
        self.runner = ModelRunner(base, cache)
        vocab_size = base.model.get_output_embeddings().weight.shape[0]  # the logits' width
        self.grammars = Grammars(base.tokenizer, vocab_size, base.eos_token_ids)
        self.sampler = Sampler(vocab_size, base.device, base.eos_token_ids, self.grammars)
        self.num_steps = 0
        self.observer = observer or EngineObserver()

    @property
    def max_slots(self) -> int:
        """Token slots of the whole block pool: no request can hold more."""
        return self.blocks.capacity_tokens

    # -- requests -----------------------------------------------------------------------------------------

    def check_fits(self, seq: Sequence) -> None:
        """Raise :class:`RequestInvalid` (a client error) for a request that can never be served."""
        check_fits(len(seq.prompt_ids), seq.prefix, seq.params.max_new_tokens, self.base.shape.max_positions,
                   self.max_slots)
        check_grammar(self.grammars, seq)

    def submit(self, seq: Sequence) -> None:
        """Check ``seq`` (:meth:`check_fits`), then queue it: the in-process callers' verb."""
        self.check_fits(seq)
        self.enqueue(seq)

    def enqueue(self, seq: Sequence) -> None:
        """Queue ``seq`` as it is: for requests checked before (the HTTP process checks what it sends to the
        engine process, with the limits the engine reported when ready)."""
        self.scheduler.add(seq)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler)

    @property
    def num_decoding(self) -> int:
        """Running requests past their prefill (they get one token a step)."""
        return sum(1 for seq in self.scheduler.running if seq.output_ids and seq.num_pending == 1)

    # -- the loop -----------------------------------------------------------------------------------------

    def step(self) -> int:
        """One forward (next tokens for the running, prefill for the joining); returns tokens produced."""
        scheduler = self.scheduler
        for seq in list(scheduler.running):  # a cancelled request stops costing compute at once
            if seq.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                scheduler.finish(seq)
        plan = scheduler.schedule()
        for seq in plan.preempted:
            self.observer.preempted(seq)
        if plan.joined:
            self.observer.admitted(plan.joined, time.monotonic())
            for seq in plan.joined:
                if not self._admit(seq):
                    scheduler.finish(seq)
                    plan.prefill = [entry for entry in plan.prefill if entry[0] is not seq]
        if plan.empty:
            return 0
        if plan.decode:
            self.observer.decoded(len(plan.decode))
        sampling = plan.decode + [seq for seq, count in plan.prefill
                                  if seq.num_computed + count == seq.num_tokens]
        self.sampler.prefetch_masks(sampling)  # grammar masks fill while the forward runs
        prompt_before = {seq.id: min(seq.num_computed, seq.input_len) for seq, _ in plan.prefill}
        out = self.runner.step(plan)
        for seq, _ in plan.prefill:
            done = min(seq.num_computed, seq.input_len) - max(prompt_before[seq.id], seq.num_soft_tokens)
            if done > 0:
                self.observer.prefilled(seq, done)
        for scored in out.prompt:
            self._append_prompt_logprobs(scored)
        sampled = self.sampler.sample(out.next, out.seqs)
        produced = self._append_tokens(sampled, out.seqs, time.monotonic())
        self.num_steps += 1
        return produced

    def _admit(self, seq: Sequence) -> bool:
        """Make the sampler's state for a joining request; a request whose state cannot be made fails
        alone."""
        try:
            self.sampler.admit(seq)
            return True
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, only this request fails, not the step
            log.warning("request %s failed at admission: %s", seq.id, exc)
            self._finish(seq, FinishReason.ERROR, f"request failed: {exc}")
            return False

    def _append_prompt_logprobs(self, scored: PromptLogits) -> None:
        seq = scored.seq
        targets = seq.prompt_ids[scored.first: scored.first + scored.logits.shape[0]]
        top = seq.params.prompt_logprobs
        assert top is not None, "the runner scores the prompts of the requests that asked"
        entries = token_logprobs(scored.logits, targets, top)
        seq.num_prompt_logprobs += len(entries)
        self.observer.prompt_logprobs(seq, entries)

    def _append_tokens(self, sampled: SampleResult, seqs: list[Sequence], now: float) -> int:
        """Give ``seqs[i]`` its new token ``sampled.tokens[i]``, then let finished sequences leave the batch.

        A row that could not be sampled fails alone; a row asking for no tokens (prompt scoring) finishes
        without one.
        """
        done: dict[int, tuple[FinishReason, str | None]] = {}
        for row, token in enumerate(sampled.tokens):
            seq = seqs[row]
            if row in sampled.errors:
                done[row] = (FinishReason.ERROR, sampled.errors[row])
                continue
            if seq.params.max_new_tokens == 0:
                done[row] = (FinishReason.CANCELLED if seq.cancelled else FinishReason.LENGTH, None)
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.output_ids.append(token)
            self.observer.token(seq, token, sampled.logprobs.get(row), now)
            reason = FinishReason.CANCELLED if seq.cancelled else self._stop_reason(seq, token)
            if reason is not None:
                done[row] = (reason, None)
        # Finished before released: whoever sees the row gone also sees the request counted.
        for row, (reason, error) in done.items():
            seq = seqs[row]
            if error is not None:
                log.warning("request %s failed while sampling: %s", seq.id, error)
            self._finish(seq, reason, error)
            self.scheduler.finish(seq, trusted=error is None)
        return len(sampled.tokens) - len(sampled.errors)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if len(seq.output_ids) < params.min_tokens:  # EOS and stop ids were masked until now
            return None
        if token in self.base.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        self.sampler.release(seq)
        self.observer.finished(seq, reason, error, time.monotonic())

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` (e.g. its client went away): at once if waiting, at the next step if running."""
        if self.scheduler.remove(seq):
            self._finish(seq, FinishReason.CANCELLED)
            return
        seq.cancelled = True

    def fail_running(self, message: str) -> None:
        """Fail every running request (after a failed forward the cache contents are not trusted)."""
        failed = list(self.scheduler.running)
        self.scheduler.running.clear()
        self.blocks.reset()
        for seq in failed:
            self._finish(seq, FinishReason.ERROR, message)

    def run_until_idle(self) -> None:
        """Step until nothing is waiting or running (for tests, benchmarks and offline use)."""
        while self.num_waiting or self.num_running:
            self.step()
