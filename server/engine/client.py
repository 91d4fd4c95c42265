"""The engine as the HTTP process sees it: the verbs of :class:`~server.engine.engine.Engine` (``check_fits``,
``submit``, ``cancel``), served by the engine process (:mod:`server.engine.core`).

Every request submitted here has a *mirror* :class:`Sequence` in this process: the route built it, and the
client keeps it up to date from the engine's step outputs (tokens, admission and finish, with the engine's
timestamps), then calls its ``on_token`` / ``on_finish`` callbacks on the event loop, as the engine thread
did. What needs text happens here, never in the engine process: stop strings are looked for in each new
token's text, and a hit finishes the mirror at once and aborts the engine's copy.

Admission control lives here too, where a refusal can still be an HTTP status: at most
``max_waiting`` sequences wait for the batch (past it, :class:`EngineOverloaded`: a 503 with
``Retry-After``), a sequence with a ``deadline`` that has not joined the batch by then leaves the queue
unserved (``FinishReason.TIMEOUT``), and a dead, stuck or draining engine fails what it holds with
``seq.unavailable`` set (503) instead of leaving clients hanging.

Liveness too: the engine sends a message after every step and a heartbeat at least every 0.5 s when idle
(:mod:`server.engine.protocol`). An engine process that exits, or stays silent for ``stall_timeout``
seconds (``--engine-stall-timeout``), is replaced: killed, and a new one started as
:class:`~server.engine.supervisor.RestartPolicy` allows, while requests get 503 with a ``Retry-After`` of
the expected restart time (:mod:`server.engine.supervisor`). Task tensors are sent again to the new engine as
requests name them; past the policy's limit the supervisor gives up and the server exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import safetensors.torch
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from prefixes.artifact import ModelShape
from server.engine import protocol
from server.engine.core import EngineCoreSpec
from server.engine.engine import EngineObserver, RequestInvalid, check_fits, output_text
from server.engine.grammar_check import GrammarChecker
from server.engine.model import check_supported, resolve_model
from server.engine.sequence import FinishReason, Sequence
from server.engine.supervisor import EngineProcess, EngineStartFailed, EngineSupervisor
from server.errors import RETRY_AFTER_S

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine process is not serving (it died or stalled and is being replaced, it is down for good, or
    the server is shutting down): a 503, with ``Retry-After: retry_after`` unless that is None (retrying
    this server cannot succeed)."""

    def __init__(self, message: str, retry_after: int | None = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: retry later (503 with Retry-After)."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the HTTP process knows of the model the engine process loaded (the weights stay there)."""

    tokenizer: PreTrainedTokenizerBase
    shape: ModelShape
    model_id: str
    eos_token_ids: frozenset[int]
    dtype: torch.dtype
    device: str
    max_slots: int  # token slots of the engine's key/value block pool (no request can hold more)
    vocab_size: int  # the width of the model's logits (token ids beyond the tokenizer's may exist)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_waiting: int  # sequences waiting for the batch, beyond which new ones are refused
    request_timeout: float | None  # default deadline (seconds from arrival to joining the batch)
    prefix_cache_bytes: int  # task tensors the engine process keeps (least recently used ones are dropped)
    stall_timeout: float = 30.0  # seconds without a message from a live engine before it is replaced
    max_restarts: int = 5  # engine replacements allowed in any 60 s; past it the server gives up


class EngineClient:
    def __init__(
        self,
        spec: EngineCoreSpec,
        limits: EngineLimits,
        observer: EngineObserver | None = None,
        env: dict[str, str] | None = None,
        on_restart: Callable[[str], None] | None = None,
    ):
        self.spec = spec
        self.limits = limits
        self.observer = observer or EngineObserver()
        self._model: ServedModel | None = None  # set by start()
        self.num_running = 0  # as of the engine's last step
        self.num_waiting = 0  # sequences submitted here that have not joined the batch
        self._waiting_by_tenant: dict[str, int] = {}  # the same, per tenant (only tenants with some)
        self.draining = False
        self._kv_totals = [0, 0, 0]  # the engine's cumulative prefix-cache queries, hits, preemptions
        # the engine process: started, watched, replaced when it dies or stalls (status, restarts, gave_up)
        self.supervisor = EngineSupervisor(spec, env, limits.stall_timeout, limits.max_restarts,
                                           self._engine_ready, self._engine_lost, on_restart)
        self._seqs: dict[int, Sequence] = {}  # mirrors of every unfinished sequence, by id
        self._prefixes: OrderedDict[str, int] = OrderedDict()  # refs the engine holds -> bytes, LRU order
        self._prefix_bytes = 0
        self._reader: asyncio.Task | None = None  # reads the current engine process's outputs
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._grammars: GrammarChecker | None = None  # set by start()
        self._ipc_dir: Path | None = None  # holds the sockets' files; removed by close()

    @classmethod
    def for_model(
        cls,
        model: str,
        dtype: str,
        device: str,
        threads: int,
        max_batch_size: int,
        kv_cache_bytes: int,
        max_step_tokens: int,
        limits: EngineLimits,
        observer: EngineObserver | None = None,
        env: dict[str, str] | None = None,
        on_restart: Callable[[str], None] | None = None,
        cache_options: dict | None = None,
    ) -> EngineClient:
        folder = Path(tempfile.mkdtemp(prefix="prefix-serve-ipc-"))
        spec = EngineCoreSpec(
            model=model,
            dtype=dtype,
            device=device,
            threads=threads,
            max_batch_size=max_batch_size,
            kv_cache_bytes=kv_cache_bytes,
            max_step_tokens=max_step_tokens,
            input_address=f"ipc://{folder}/in",
            output_address=f"ipc://{folder}/out",
            parent_pid=os.getpid(),
            cache_options=dict(cache_options or {}),
        )
        client = cls(spec, limits, observer, env, on_restart)
        client._ipc_dir = folder
        return client

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 900.0) -> ServedModel:
        """Start the engine process and wait until its model is loaded; raise with its reason if it fails."""
        path, _ = await asyncio.to_thread(resolve_model, self.spec.model)  # converts the default model once
        check_supported(await asyncio.to_thread(AutoConfig.from_pretrained, path))  # refuse before spawning
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        try:
            info = await self.supervisor.start(timeout)
        except EngineStartFailed as exc:
            raise RuntimeError(str(exc)) from None
        self._model = ServedModel(
            tokenizer,
            ModelShape(**info["shape"]),
            info["model_id"],
            frozenset(info["eos_token_ids"]),
            getattr(torch, info["dtype"]),
            info["device"],
            info["max_slots"],
            info["vocab_size"],
        )
        # Structured-output specs are checked before submission, so a bad schema is a 400 before anything
        # streams; in a child process, so a grammar that crashes the grammar library crashes nothing else.
        self._grammars = GrammarChecker(str(path), info["vocab_size"], frozenset(info["eos_token_ids"]))
        await asyncio.to_thread(self._grammars.start)
        return self._model

    def _engine_ready(self, process: EngineProcess) -> None:
        """A (new) engine process is ready: read its outputs. It holds no task tensors yet: each is sent
        again when a request names it."""
        self._prefixes.clear()
        self._prefix_bytes = 0
        self._reader = asyncio.create_task(self._read_outputs(process), name="engine-outputs")

    def _engine_lost(self, message: str) -> None:
        """The engine process is gone (killed as stuck, or dead): fail everything it held (503)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.num_running = 0
        if self._seqs:
            log.error("failing %d requests: %s", len(self._seqs), message)
        self._fail_all(message)

    @property
    def model(self) -> ServedModel:
        if self._model is None:
            raise RuntimeError("the engine client has not started")
        return self._model

    @property
    def pid(self) -> int | None:
        process = self.supervisor.process
        return process.pid if process is not None else None

    @property
    def engine_info(self) -> dict:
        """What the engine process said when ready (pid, threads, device, ...)."""
        return self.supervisor.info

    @property
    def unavailable(self) -> str | None:
        """Why the engine cannot serve, while it cannot (see :class:`EngineSupervisor`)."""
        return self.supervisor.unavailable

    @property
    def retry_after(self) -> int | None:
        return self.supervisor.retry_after

    @property
    def num_in_flight(self) -> int:
        return len(self._seqs)

    async def drain(self, timeout: float) -> int:
        """Stop admitting; wait up to ``timeout`` seconds for what is in flight, then fail the rest (503).
        Returns how many were failed."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._seqs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self._seqs)
        if left:
            log.warning("shutdown: %d requests still running after %.0fs; cancelling them", left, timeout)
            self._abort(list(self._seqs))
            self._fail_all("the server is shutting down; retry on another replica")
        return left

    async def close(self) -> None:
        """Stop the engine process (after :meth:`drain`, nothing is left to lose)."""
        self.draining = True
        self._fail_all("the server is shutting down; retry on another replica")
        if self._reader is not None:
            self._reader.cancel()
        await self.supervisor.stop()
        if self._grammars is not None:
            self._grammars.close()
        folder = self._ipc_dir
        if folder is not None:
            for leftover in folder.glob("*"):
                leftover.unlink(missing_ok=True)
            folder.rmdir()
            self._ipc_dir = None

    # -- requests --------------------------------------------------------------------------------------------

    def check_fits(self, seq: Sequence) -> None:
        """Raise :class:`RequestInvalid` for a request the engine could never serve (too long)."""
        check_fits(seq, self.model.shape.max_positions, self.model.max_slots)

    async def check_structured(self, seq: Sequence) -> None:
        """Raise :class:`RequestInvalid` when ``seq``'s structured output cannot be followed (checked within
        the limits of server/engine/grammar.py, in the grammar checker's process)."""
        if seq.params.structured is None or self._grammars is None:
            return
        error = await self._grammars.check(*seq.params.structured)
        if error is not None:
            raise RequestInvalid(error)

    def check_admission(self, count: int, tenant: str) -> None:
        """Raise unless ``count`` more sequences of ``tenant`` may wait now: the engine is serving and the
        waiting queue has room.

        The queue is what cannot join the batch at its next step (requests beyond its free rows). Past its
        limit a tenant still gets in while it holds less than its fair share of the limit (the limit over the
        tenants waiting), so one tenant's flood fills the queue for itself, not for everyone; the queue then
        holds at most twice the limit. A request larger than the whole limit gets in when nothing waits."""
        if self.unavailable is not None:
            raise EngineUnavailable(self._unavailable_message(), self.retry_after)
        if self.draining:
            raise EngineUnavailable("the server is shutting down; retry on another replica")
        free_rows = max(0, self.spec.max_batch_size - self.num_running)
        queued = self.num_waiting - free_rows
        limit = self.limits.max_waiting
        if not self.num_waiting or queued + count <= limit:
            return
        waiting_tenants = len(self._waiting_by_tenant) + (tenant not in self._waiting_by_tenant)
        if self._waiting_by_tenant.get(tenant, 0) + count <= limit // waiting_tenants:
            return
        raise EngineOverloaded(
            f"{max(queued, 0)} requests are already waiting for a place in the batch, the "
            "server's limit (--max-waiting-requests); retry shortly"
        )

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` in the engine (after :meth:`check_admission`); ContextTooLong if it can never fit."""
        if self.unavailable is not None:
            raise EngineUnavailable(self._unavailable_message(), self.retry_after)
        self.check_fits(seq)
        ref = self._ship_prefix(seq.prefix) if seq.prefix is not None else None
        self._seqs[seq.id] = seq
        self._count_waiting(seq, +1)
        timeout = self.limits.request_timeout
        if seq.deadline is None and timeout is not None:
            seq.deadline = seq.arrival_time + timeout
        if seq.deadline is not None:
            loop = asyncio.get_running_loop()
            self._timers[seq.id] = loop.call_at(
                loop.time() + max(0.0, seq.deadline - time.monotonic()), self._expire, seq
            )
        self._send(
            protocol.encode_request(
                protocol.RequestSpec(
                    seq.id,
                    list(seq.prompt_ids),
                    protocol.params_to_dict(seq.params),
                    ref,
                    seq.tenant,
                    seq.arrival_time,
                )
            )
        )

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq``: the engine finishes it as cancelled at its next step (``on_finish`` runs then)."""
        if seq.id in self._seqs:
            seq.cancelled = True
            self._abort([seq.id])

    def _expire(self, seq: Sequence) -> None:
        self._timers.pop(seq.id, None)
        if seq.finished or seq.admit_time is not None:
            return
        self._abort([seq.id])
        waited = time.monotonic() - seq.arrival_time
        self._finish(
            seq,
            FinishReason.TIMEOUT,
            f"the request waited {waited:.1f}s for a place in the batch, past "
            "its deadline (timeout / --request-timeout); the server is busy, retry later",
        )

    def _unavailable_message(self) -> str:
        assert self.unavailable is not None, "only while the engine cannot serve"
        if self.supervisor.gave_up:
            return self.unavailable
        return f"{self.unavailable}; a new engine process is starting, retry in {self.retry_after}s"

    def _send(self, message: list) -> None:
        process = self.supervisor.process
        if process is None:
            raise EngineUnavailable("the engine process is being replaced", self.retry_after)
        process.send(message)

    def _abort(self, ids: list[int]) -> None:
        process = self.supervisor.process
        if self.unavailable is None and process is not None and process.alive:
            process.send([protocol.ABORT, ids])

    def _ship_prefix(self, prefix) -> str:
        """Make sure the engine holds ``prefix``'s tensor; returns the ref requests name it by.

        The tensor crosses as a safetensors file on shared memory, written here and deleted by the engine once
        on its device; the engine keeps it until told to drop it, so a task crosses once while it stays hot.
        """
        record = prefix.record
        ref = f"{record.key}@{record.version}#{record.sha256[:16]}"
        if ref in self._prefixes:
            self._prefixes.move_to_end(ref)
            return ref
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="prefix-serve-", suffix=".safetensors", dir=folder)
        os.close(fd)
        safetensors.torch.save_file({"tensor": prefix.tensor.detach().contiguous().cpu()}, path)
        self._send([protocol.PREFIX, ref, path, prefix.kind.value])
        size = prefix.tensor.numel() * prefix.tensor.element_size()
        self._prefixes[ref] = size
        self._prefix_bytes += size
        while self._prefix_bytes > self.limits.prefix_cache_bytes and len(self._prefixes) > 1:
            old, old_size = self._prefixes.popitem(last=False)
            self._prefix_bytes -= old_size
            self._send([protocol.DROP, old])
        return ref

    # -- outputs ---------------------------------------------------------------------------------------------

    async def _read_outputs(self, process: EngineProcess) -> None:
        while True:
            message = await process.recv()
            self.supervisor.heard()  # any message: the engine's loop is turning
            if message[0] == protocol.HEARTBEAT:
                self.num_running = protocol.Heartbeat.decode(message[1]).running
                continue
            if message[0] != protocol.STEP:
                log.error("unexpected message from the engine: %r", message[0])
                continue
            try:
                self._apply(protocol.StepOutput.decode(message[1]))
            except Exception:  # a bug here must not stop every later request's outputs
                log.exception("applying an engine step failed")

    def _apply(self, out: protocol.StepOutput) -> None:
        seq: Sequence | None
        now = out.time
        self.num_running = out.running
        admitted = [self._seqs[i] for i in out.admitted if i in self._seqs]
        for seq in admitted:
            seq.admit_time = now
            self._count_waiting(seq, -1)
            timer = self._timers.pop(seq.id, None)
            if timer is not None:
                timer.cancel()
        if admitted:
            self.observer.admitted(admitted, now)
        if out.decoded:
            self.observer.decoded(out.decoded)
        self._apply_cache(out)
        for seq_id, entries in out.prompt_logprobs:
            seq = self._seqs.get(seq_id)
            if seq is not None:
                seq.prompt_logprobs.extend(entries)
        touched = []
        for seq_id, token, logprobs in out.tokens:
            seq = self._seqs.get(seq_id)
            if seq is None:
                continue  # finished here already (stop string, deadline): the engine's extra token is dropped
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.observer.token(seq, now)
            seq.last_token_time = now
            if logprobs is not None:  # before the id, as in the engine: whoever sees the id sees its logprob
                seq.output_logprobs.append(logprobs)
            seq.output_ids.append(token)
            if (seq.params.stop and len(seq.output_ids) >= seq.params.min_tokens
                    and self._stop_string_hit(seq)):
                self._abort([seq.id])
                self._finish(seq, FinishReason.STOP)
            else:
                touched.append(seq)
        for seq in touched:
            if seq.on_token is not None and not seq.finished:
                _call(seq.on_token, seq)
        for seq_id, reason, error in out.finished:
            seq = self._seqs.get(seq_id)
            if seq is not None:
                self._finish(seq, FinishReason(reason), error)

    def _apply_cache(self, out: protocol.StepOutput) -> None:
        for seq_id, tokens in out.cached:
            if (seq := self._seqs.get(seq_id)) is not None:
                seq.num_cached_tokens = tokens
        for seq_id, tokens in out.prefilled:
            if (seq := self._seqs.get(seq_id)) is not None:
                self.observer.prefilled(seq, tokens)
        if out.kv:
            usage, totals = out.kv[0], [int(v) for v in out.kv[1:]]
            # a new engine process counts from 0 again
            deltas = [t - last if t >= last else t for t, last in zip(totals, self._kv_totals)]
            self._kv_totals = totals
            self.observer.cache_stats(usage, *deltas)

    def _stop_string_hit(self, seq: Sequence) -> bool:
        """Whether the output now holds one of ``seq``'s stop strings; if so its text is cut before it."""
        # one sequence of ids decodes to one string (transformers types decode's result for batches too)
        text = cast(str, self.model.tokenizer.decode(seq.output_ids, skip_special_tokens=True))
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = text[: min(hits)]  # the stop string itself is not returned
        return bool(hits)

    def _finish(
        self, seq: Sequence, reason: FinishReason, error: str | None = None, unavailable: bool = False
    ) -> None:
        if self._seqs.pop(seq.id, None) is None:
            return
        if seq.admit_time is None:
            self._count_waiting(seq, -1)
        timer = self._timers.pop(seq.id, None)
        if timer is not None:
            timer.cancel()
        if seq.text is None:
            seq.text = output_text(self.model.tokenizer, seq)
        seq.finish_reason, seq.error, seq.unavailable = reason, error, unavailable
        self.observer.finished(seq, time.monotonic())
        if seq.on_finish is not None:
            _call(seq.on_finish, seq)

    def _count_waiting(self, seq: Sequence, delta: int) -> None:
        self.num_waiting += delta
        left = self._waiting_by_tenant.get(seq.tenant, 0) + delta
        if left:
            self._waiting_by_tenant[seq.tenant] = left
        else:
            self._waiting_by_tenant.pop(seq.tenant, None)

    def _fail_all(self, message: str) -> None:
        for seq in list(self._seqs.values()):
            self._finish(seq, FinishReason.ERROR, message, unavailable=True)


def _call(callback, seq: Sequence) -> None:
    try:
        callback(seq)
    except Exception:  # a broken callback must not stop the outputs of everyone else
        log.exception("callback %s failed for request %s", callback, seq.id)
