"""What the HTTP process and the engine process say to each other: ZeroMQ PUSH/PULL sockets, msgpack frames.

Two one-way channels, each ordered (so a task's prefix always arrives before the first request that uses it):

HTTP -> engine (:data:`ADD`, :data:`ABORT`, :data:`PREFIX`, :data:`DROP`, :data:`SHUTDOWN`)::

    [ADD, request]            a new sequence (see :func:`encode_request`)
    [ABORT, [id, ...]]        stop these sequences (client gone, stop string seen, deadline passed)
    [PREFIX, ref, path, kind] a task's tensor, written to a safetensors file on shared memory (/dev/shm);
                              the engine copies it to its device and deletes the file
    [DROP, ref]               the engine may forget this task's tensor (running rows keep their reference)
    [SHUTDOWN]

engine -> HTTP::

    [READY, info]             the model is loaded (shape, eos ids, key/value budget): serving may start
    [STEP, step]              what one engine step produced (see :class:`StepOutput`); sent after every
                              step, even one that finished no token (a prefill chunk): the step heartbeat
    [HEARTBEAT, beat]         an idle engine is alive (see :class:`Heartbeat`), at least every
                              :data:`HEARTBEAT_INTERVAL_S`
    [FATAL, message]          start-up failed (e.g. an unsupported model); the process exits

Any message from the engine is proof of progress: the HTTP process replaces an engine that stays silent for
``--engine-stall-timeout`` seconds (:mod:`server.engine.supervisor`).

Only plain data crosses: ids, numbers, strings. Nothing is pickled, and tensors travel only as files in the
safetensors format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from server.engine.sequence import SamplingParams

ADD, ABORT, PREFIX, DROP, SHUTDOWN = "add", "abort", "prefix", "drop", "shutdown"
READY, STEP, HEARTBEAT, FATAL = "ready", "step", "heartbeat", "fatal"

# An idle engine says it is alive this often (it wakes that often anyway to look for a vanished parent); a
# busy one says so after every step. Well under a second, as the stall detector's resolution.
HEARTBEAT_INTERVAL_S = 0.5


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> list:
    # strict_map_key=False: logit_bias and similar maps are keyed by token id
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One sequence as the engine needs it; the HTTP process keeps the rest (stop strings, callbacks)."""

    id: int
    prompt_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields
    prefix_ref: str | None  # a ref sent earlier with PREFIX, or None for the base model
    tenant: str
    arrival_time: float  # time.monotonic() of the HTTP process: CLOCK_MONOTONIC is shared by all processes


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    # Stop strings are the HTTP process's business (it detokenizes), so the engine never decodes text.
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "stop"}


def params_from_dict(values: dict[str, Any]) -> SamplingParams:
    # msgpack turns tuples into lists; give tuple-typed fields their tuples back (params are frozen/hashable)
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default if name in fields else None
        kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return SamplingParams(**kwargs)


def encode_request(spec: RequestSpec) -> list:
    return [ADD, dataclasses.asdict(spec)]


def decode_request(body: dict) -> RequestSpec:
    return RequestSpec(**body)


@dataclass(slots=True)
class StepOutput:
    """What one engine step changed, for every sequence it touched.

    ``tokens``: ``[id, token, logprobs]`` per sequence that got a token (``logprobs``: the token's entry of
    ``Sequence.output_logprobs`` when the request asked for them, else None); ``prompt_logprobs``: ``[id,
    entries]``, the entries of ``Sequence.prompt_logprobs`` this step added (prompt scoring, chunk by chunk);
    ``finished``: ``[id, reason, error]``; ``admitted``: ids that joined the batch at ``time``; ``decoded``:
    rows that got their next token (the batch size of the step); ``running`` / ``waiting``: the engine's
    counts after the step; ``prefilled``, ``cached`` and ``kv`` feed the metrics and usage. The receiver
    applies them in this order: admitted, prompt_logprobs, tokens, finished.
    """

    time: float
    tokens: list[list] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[list] = dataclasses.field(default_factory=list)
    finished: list[list] = dataclasses.field(default_factory=list)
    admitted: list[int] = dataclasses.field(default_factory=list)
    decoded: int = 0
    running: int = 0
    waiting: int = 0
    prefilled: list[list] = dataclasses.field(default_factory=list)  # [id, prompt tokens computed this step]
    cached: list[list] = dataclasses.field(default_factory=list)  # [id, tokens taken from the prefix cache]
    # the key/value cache after the step: [usage fraction, then cumulative prefix-cache queries and hits (in
    # tokens) and preemptions since the engine process started]
    kv: list[float] = dataclasses.field(default_factory=list)

    def encode(self) -> list:
        return [STEP, dataclasses.asdict(self)]

    @classmethod
    def decode(cls, body: dict) -> StepOutput:
        return cls(**body)

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.prompt_logprobs or self.finished or self.admitted)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An idle engine's sign of life: its clock and counts (``running`` / ``waiting``, as in a step)."""

    time: float
    running: int = 0
    waiting: int = 0

    def encode(self) -> list:
        return [HEARTBEAT, dataclasses.asdict(self)]

    @classmethod
    def decode(cls, body: dict) -> Heartbeat:
        return cls(**body)
