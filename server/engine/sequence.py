"""Per-request state: what was asked (prompt, task prefix, sampling) and what has been generated."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixes.store import ResidentPrefix


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"
    ERROR = "error"
    TIMEOUT = "timeout"  # still waiting when its deadline passed: it left the queue unserved


_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    prefix: ResidentPrefix | None = None
    tenant: str = "default"  # whose queue it waits in (fair scheduling)
    on_finish: Callable[[Sequence], None] | None = None  # called once on the engine thread
    on_token: Callable[[Sequence], None] | None = None  # called after each new token (streaming)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str | None = None  # set when the request finishes
    finish_reason: FinishReason | None = None
    error: str | None = None
    cancelled: bool = False
    unavailable: bool = False  # failed because the engine is gone or shutting down: retry later (503)
    deadline: float | None = None  # time.monotonic() by which it must have joined the batch, or leave unserved
    generator: torch.Generator | None = None  # set for seeded sampling
    arrival_time: float = field(default_factory=time.monotonic)
    admit_time: float | None = None  # when it joined the batch
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_computed: int = 0  # inputs (soft prompt + prompt) already in the key/value cache (chunked prefill)

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
    def prefilled(self) -> bool:
        return self.num_computed == self.input_len

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
