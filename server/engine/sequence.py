"""Per-request state in the engine: what was asked (prompt, task prefix, sampling) and what was generated.

The HTTP process follows a request with its own thin state (:mod:`server.frontend.request_state`); the two
share nothing but the messages of :mod:`server.engine.protocol`.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from prefixes.artifact import PrefixKind
from server.engine.protocol import MIN_TEMPERATURE, EngineParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for ``logprobs`` / ``top_logprobs``
# Structured-output kinds: the grammar source the engine compiles for each (``structured = (kind, spec)``).
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Everything a request asks for, as plain data (numbers, strings, tuples), checked once on construction.
    The engine gets all of it but the stop strings (:meth:`for_engine`); no tensors, callables or compiled
    grammars live here."""

    max_new_tokens: int = 64  # 0: score the prompt only (prompt_logprobs), generate nothing
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are masked (and stop strings not checked) until this many
    stop_token_ids: tuple[int, ...] = ()  # a generated id in here ends the request like EOS
    presence_penalty: float = 0.0  # OpenAI: minus this once for every id already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the id's count in the output
    repetition_penalty: float = 1.0  # CTRL/HF: ids seen in prompt or output: logit / p if > 0, else * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # per generated token: its log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # (kind in STRUCTURED_KINDS, spec): the output follows a grammar
    structured: tuple[str, str] | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be at least 0")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_new_tokens, 0):
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 (1 disables it)")
        if any(not math.isfinite(b) or not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.structured is not None and self.structured[0] not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def for_engine(self) -> EngineParams:
        """What the engine process needs (all but the stop strings: text is the HTTP process's), already
        checked: it is not checked again there."""
        fields = dataclasses.fields(self)
        return EngineParams(**{f.name: getattr(self, f.name) for f in fields if f.name != "stop"})


# What the engine's sequences hold: the in-process callers' SamplingParams (training, benchmarks, tests) or
# the EngineParams a request crossed the process boundary with; the engine reads only their common fields.
Sampling = SamplingParams | EngineParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"
    ERROR = "error"
    TIMEOUT = "timeout"  # still waiting when its deadline passed: it left the queue unserved


_ids = itertools.count()


class TaskPrefix(Protocol):
    """What a sequence needs of its task's prefix: the store's ResidentPrefix (HTTP process) and the engine's
    EnginePrefix both are one. Declared here so that the engine does not import the store."""

    @property
    def kind(self) -> PrefixKind: ...

    @property
    def num_virtual_tokens(self) -> int: ...

    @property
    def tensor(self) -> torch.Tensor: ...  # deep: [L, 2, Hkv, P, D]; soft prompt: [P, H]


@dataclass(eq=False, slots=True)
class Sequence:
    """What scheduling and sampling read, no more: logprobs, finishes and the front end's timings are
    reported to the :class:`~server.engine.engine.EngineObserver` as they happen and kept by the front end
    (:class:`~server.frontend.request_state.RequestState`), not here."""

    prompt_ids: list[int]
    params: Sampling
    prefix: TaskPrefix | None = None
    tenant: str = "default"  # whose queue it waits in (fair scheduling)
    id: int = field(default_factory=lambda: next(_ids))
    # On both sides: here it is the next decode input, what a preempted request recomputes, what penalties and
    # stop checks count; the front end detokenizes and returns its own copy, built from the step outputs.
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    # Engine-side times for the in-process key/value bench's time to first token (server/bench/kv.py); the
    # front end times requests on its own (its arrival, and the step outputs' times).
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # tokens (soft prompt, prompt, then generated) whose keys/values are in the cache: prefill goes chunk by
    # chunk, and a preempted sequence starts again from 0 and recomputes all it had
    num_computed: int = 0
    # prompt tokens it took from the prefix cache instead of computing them; sent in StepOutput.cached (the
    # front end's copy is the usage it reports), read here by the in-process bench (server/bench/kv.py)
    num_cached_tokens: int = 0
    # prompt tokens (from the second on) whose logprobs were reported: scoring goes chunk by chunk, and a
    # preempted request does not score them again
    num_prompt_logprobs: int = 0
    num_preemptions: int = 0  # a waiting sequence with none has never joined the batch (admission)

    @property
    def num_soft_tokens(self) -> int:
        """Virtual tokens fed at the input layer (P-Tuning v1 / prompt tuning)."""
        return self.prefix.num_virtual_tokens if self.prefix and not self.prefix.kind.is_deep else 0

    @property
    def num_prefix_kv(self) -> int:
        """Virtual tokens placed directly in every layer's key/value cache (prefix-tuning / P-Tuning v2)."""
        return self.prefix.num_virtual_tokens if self.prefix and self.prefix.kind.is_deep else 0

    @property
    def input_len(self) -> int:
        """Positions the prefill computes for this request: soft prompt plus prompt tokens."""
        return self.num_soft_tokens + len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        """Positions this request can reach: every virtual token, the prompt and the generation budget."""
        return self.num_prefix_kv + self.input_len + self.params.max_new_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens whose keys/values the cache must hold before the next one is sampled: the inputs and every
        generated token (the last of which is the next decode step's input)."""
        return self.input_len + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens to compute before the next token can be sampled (1 for a decoding sequence)."""
        return self.num_tokens - self.num_computed

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.input_len

    def all_tokens(self) -> list[int]:
        """Token ``i`` of the cache's view of this sequence (soft-prompt positions read as 0: the task
        identifies them)."""
        return [0] * self.num_soft_tokens + self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        n_soft = self.num_soft_tokens
        if i < n_soft:
            return 0
        i -= n_soft
        return self.prompt_ids[i] if i < len(self.prompt_ids) else self.output_ids[i - len(self.prompt_ids)]

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

