"""What the HTTP process and the engine process say to each other: ZeroMQ PUSH/PULL sockets carrying typed
messages (msgspec ``Struct`` s, encoded as msgpack and decoded once, with validation, into these types).

Two one-way channels, each ordered (so a task's prefix always arrives before the first request that uses it):

HTTP -> engine (:data:`ToEngine`)::

    AddRequest   a new sequence: prompt ids, what sampling needs (:class:`EngineParams`), task, tenant
    Abort        stop these sequences (client gone, stop string seen, deadline passed)
    LoadPrefix   a task's tensor, written to a safetensors file on shared memory (/dev/shm); the engine
                 copies it to its device and deletes the file
    DropPrefix   the engine may forget this task's tensor (running rows keep their reference)
    Shutdown

engine -> HTTP (:data:`FromEngine`)::

    Ready        the model is loaded (shape, eos ids, key/value budget): serving may start
    StepOutput   what one engine step produced: token ids, logprobs, finishes, counts; sent after every
                 step, even one that finished no token (a prefill chunk): the step heartbeat
    Heartbeat    an idle engine is alive, at least every :data:`HEARTBEAT_INTERVAL_S`
    Fatal        start-up failed (e.g. an unsupported model); the process exits

The engine sends token ids, never text: detokenizing and stop strings are the HTTP process's
(:mod:`server.frontend.detokenizer`). Any message from the engine is proof of progress: the HTTP process
replaces an engine that stays silent for ``--engine-stall-timeout`` seconds
(:mod:`server.frontend.supervisor`).
Only plain data crosses; nothing is pickled, and tensors travel only as files in the safetensors format.
"""

from __future__ import annotations

from typing import Any

import msgspec

# An idle engine says it is alive this often (it wakes that often anyway to look for a vanished parent); a
# busy one says so after every step. Well under a second, as the stall detector's resolution.
HEARTBEAT_INTERVAL_S = 0.5

# Below this temperature a request is served greedily: dividing logits by ~1e-38 overflows float32 to
# infinities (and NaN once two of them are subtracted in the softmax), and any temperature this small
# already puts all the probability on the argmax.
MIN_TEMPERATURE = 1e-5

# A token's log-probability and its top alternatives, (id, logprob) each
Logprob = tuple[float, list[tuple[int, float]]]


class EngineParams(msgspec.Struct, frozen=True, kw_only=True):
    """What sampling a request asks of the engine, as plain data: the fields of
    :class:`~server.engine.sequence.SamplingParams` but its stop strings (text is the HTTP process's).
    Not validated here: SamplingParams checks its values once, when the HTTP process builds it, and the
    engine takes them as sent (tests/engine/test_overload.py keeps the two field lists equal)."""

    max_new_tokens: int = 64  # 0: score the prompt only (prompt_logprobs), generate nothing
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many
    stop_token_ids: tuple[int, ...] = ()  # a generated id in here ends the request like EOS
    presence_penalty: float = 0.0  # OpenAI: minus this once for every id already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the id's count in the output
    repetition_penalty: float = 1.0  # CTRL/HF: ids seen in prompt or output: logit / p if > 0, else * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # per generated token: its log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # (kind in STRUCTURED_KINDS, spec): the output follows a grammar
    structured: tuple[str, str] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


# -- HTTP -> engine ----------------------------------------------------------------------------------------


class AddRequest(msgspec.Struct, frozen=True, tag=True):
    """One sequence as the engine needs it; the HTTP process keeps the rest (stop strings, text)."""

    id: int
    prompt_ids: list[int]
    params: EngineParams
    prefix_ref: str | None  # a ref sent earlier with LoadPrefix, or None for the base model
    tenant: str


class Abort(msgspec.Struct, frozen=True, tag=True):
    ids: list[int]


class LoadPrefix(msgspec.Struct, frozen=True, tag=True):
    ref: str
    path: str  # a safetensors file holding one tensor named "tensor"; the engine deletes it
    kind: str  # a prefixes.artifact.PrefixKind value


class DropPrefix(msgspec.Struct, frozen=True, tag=True):
    ref: str


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


ToEngine = AddRequest | Abort | LoadPrefix | DropPrefix | Shutdown


# -- engine -> HTTP ----------------------------------------------------------------------------------------


class Ready(msgspec.Struct, frozen=True, tag=True):
    info: dict[str, Any]  # model id, shape, eos ids, max_slots, vocab size, dtype, device, threads, pid


class Fatal(msgspec.Struct, frozen=True, tag=True):
    message: str


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    """An idle engine's sign of life: its clock and counts (``running`` / ``waiting``, as in a step)."""

    time: float
    running: int = 0
    waiting: int = 0


class NewToken(msgspec.Struct, frozen=True, array_like=True):
    id: int  # the sequence's
    token: int
    logprobs: Logprob | None  # when the request asked for them


class PromptLogprobs(msgspec.Struct, frozen=True, array_like=True):
    id: int
    # those this step scored, in prompt order from the second token (scoring goes chunk by chunk; the first
    # prompt token has none: the front end puts its None there)
    entries: list[Logprob]


class Finished(msgspec.Struct, frozen=True, array_like=True):
    id: int
    reason: str  # a FinishReason value
    error: str | None


class KvStats(msgspec.Struct, frozen=True, array_like=True):
    """The key/value cache after a step: the fraction of blocks in use, then the prefix-cache queries and
    hits (tokens) and preemptions since the engine process started."""

    usage: float
    queries: int
    hits: int
    preemptions: int


class StepOutput(msgspec.Struct, tag=True):
    """What one engine step changed, for every sequence it touched.

    ``admitted``: ids that joined the batch at ``time``; ``decoded``: rows that got their next token (the
    batch size of the step); ``running`` / ``waiting``: the engine's counts after the step; ``prefilled``
    and ``cached``: (id, prompt tokens computed this step / taken from the prefix cache). The receiver
    applies them in this order: admitted, prompt_logprobs, tokens, finished.
    """

    time: float
    tokens: list[NewToken] = msgspec.field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = msgspec.field(default_factory=list)
    finished: list[Finished] = msgspec.field(default_factory=list)
    admitted: list[int] = msgspec.field(default_factory=list)
    decoded: int = 0
    running: int = 0
    waiting: int = 0
    prefilled: list[tuple[int, int]] = msgspec.field(default_factory=list)
    cached: list[tuple[int, int]] = msgspec.field(default_factory=list)
    kv: KvStats | None = None

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.prompt_logprobs or self.finished or self.admitted)


FromEngine = Ready | Fatal | Heartbeat | StepOutput
Message = ToEngine | FromEngine

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(frame: bytes) -> ToEngine:
    return _to_engine.decode(frame)


def decode_from_engine(frame: bytes) -> FromEngine:
    return _from_engine.decode(frame)
