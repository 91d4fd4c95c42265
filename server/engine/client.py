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
unserved (``FinishReason.TIMEOUT``), and a dead or draining engine fails what it holds with
``seq.unavailable`` set (503) instead of leaving clients hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import safetensors.torch
import torch
import zmq
import zmq.asyncio
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from prefixes.artifact import ModelShape
from server.engine import protocol
from server.engine.core import EngineCoreSpec
from server.engine.engine import EngineObserver, check_fits, check_grammar, output_text
from server.engine.grammar import Grammars
from server.engine.model import check_supported, resolve_model
from server.engine.sequence import FinishReason, Sequence

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2  # how often the engine process's liveness is checked
SHUTDOWN_WAIT_S = 10.0  # after SHUTDOWN, how long the engine process may take to exit before it is killed


class EngineUnavailable(RuntimeError):
    """The engine process is not serving (it died, or the server is shutting down): retry later (503)."""


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
    max_slots: int  # rows x columns the engine's key/value budget holds
    vocab_size: int  # the width of the model's logits (token ids beyond the tokenizer's may exist)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_waiting: int  # sequences waiting for the batch, beyond which new ones are refused
    request_timeout: float | None  # default deadline (seconds from arrival to joining the batch)
    prefix_cache_bytes: int  # task tensors the engine process keeps (least recently used ones are dropped)


class EngineClient:
    def __init__(
        self,
        spec: EngineCoreSpec,
        limits: EngineLimits,
        observer: EngineObserver | None = None,
        env: dict[str, str] | None = None,
    ):
        self.spec = spec
        self.limits = limits
        self.observer = observer or EngineObserver()
        self.env = env  # the engine process's environment (thread and OpenMP settings)
        self._model: ServedModel | None = None  # set by start()
        self.num_running = 0  # as of the engine's last step
        self.num_waiting = 0  # sequences submitted here that have not joined the batch
        self._waiting_by_tenant: dict[str, int] = {}  # the same, per tenant (only tenants with some)
        self.unavailable: str | None = None  # why the engine cannot serve, once it cannot
        self.draining = False
        self._seqs: dict[int, Sequence] = {}  # mirrors of every unfinished sequence, by id
        self._prefixes: OrderedDict[str, int] = OrderedDict()  # refs the engine holds -> bytes, LRU order
        self._prefix_bytes = 0
        self._proc: subprocess.Popen | None = None
        self._tasks: list[asyncio.Task] = []
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._grammars: Grammars | None = None  # set by start()
        self.engine_info: dict = {}  # what the engine process said when ready (pid, threads, device, ...)
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
        )
        client = cls(spec, limits, observer, env)
        client._ipc_dir = folder
        return client

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 900.0) -> ServedModel:
        """Start the engine process and wait until its model is loaded; raise with its reason if it fails."""
        path, _ = await asyncio.to_thread(resolve_model, self.spec.model)  # converts the default model once
        check_supported(await asyncio.to_thread(AutoConfig.from_pretrained, path))  # refuse before spawning
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        self._zmq = zmq.asyncio.Context()
        self._outputs = self._zmq.socket(zmq.PULL)
        self._outputs.bind(self.spec.output_address)
        self._inputs = self._zmq.socket(zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the engine reads everything each step
        self._inputs.bind(self.spec.input_address)
        # A plain Popen on purpose (it returns once the child is spawned): the process is polled from sync
        # code (`_abort`) and waited for in a thread (`_reap`), which an asyncio subprocess would not allow.
        self._proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "server.engine.core", json.dumps(asdict(self.spec))],
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if await self._outputs.poll(500):
                message = protocol.unpack(await self._outputs.recv())
                if message[0] == protocol.READY:
                    break
                if message[0] == protocol.FATAL:
                    await self._reap()
                    raise RuntimeError(f"the engine process could not start: {message[1]}")
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the engine process exited with code {self._proc.returncode} during start-up"
                )
            if time.monotonic() > deadline:
                await self._reap()
                raise RuntimeError(f"the engine process was not ready after {timeout:.0f}s")
        info = message[1]
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
        # Structured-output specs are validated here too, so a bad schema is a 400 before anything streams.
        self._grammars = Grammars(tokenizer, info["vocab_size"], frozenset(info["eos_token_ids"]))
        self.engine_info = info
        self._tasks = [
            asyncio.create_task(self._read_outputs(), name="engine-outputs"),
            asyncio.create_task(self._watch(), name="engine-watch"),
        ]
        log.info(
            "engine process %d ready: %s on %s, %d threads",
            info["pid"],
            info["model_id"],
            info["device"],
            info["threads"],
        )
        return self._model

    @property
    def model(self) -> ServedModel:
        if self._model is None:
            raise RuntimeError("the engine client has not started")
        return self._model

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def num_in_flight(self) -> int:
        return len(self._seqs)

    async def drain(self, timeout: float) -> None:
        """Stop admitting; wait up to ``timeout`` seconds for what is in flight, then fail the rest (503)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._seqs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._seqs:
            log.warning(
                "shutdown: %d requests still running after %.0fs; cancelling them", len(self._seqs), timeout
            )
            self._abort(list(self._seqs))
            self._fail_all("the server is shutting down; retry on another replica")

    async def close(self) -> None:
        """Stop the engine process (after :meth:`drain`, nothing is left to lose)."""
        self.draining = True
        self._fail_all("the server is shutting down; retry on another replica")
        for task in self._tasks:
            task.cancel()
        if self._proc is not None and self._proc.poll() is None:
            self._send([protocol.SHUTDOWN])
        await self._reap()
        for sock in (getattr(self, "_inputs", None), getattr(self, "_outputs", None)):
            if sock is not None:
                sock.close(linger=0)
        if getattr(self, "_zmq", None) is not None:
            self._zmq.term()
        folder = self._ipc_dir
        if folder is not None:
            for leftover in folder.glob("*"):
                leftover.unlink(missing_ok=True)
            folder.rmdir()

    async def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.to_thread(proc.wait, SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not exit in %.0fs; killing it", SHUTDOWN_WAIT_S)
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def _watch(self) -> None:
        proc = self._proc
        assert proc is not None, "watching starts after start()"
        while proc.poll() is None:
            await asyncio.sleep(WATCH_INTERVAL_S)
        if not self.draining:
            self.unavailable = f"the engine process exited unexpectedly (code {proc.returncode})"
            self.num_running = 0
            log.error("%s; failing %d requests", self.unavailable, len(self._seqs))
            self._fail_all(self.unavailable + "; the server cannot serve until it is restarted")

    # -- requests --------------------------------------------------------------------------------------------

    def check_fits(self, seq: Sequence) -> None:
        """Raise :class:`RequestInvalid` for a request the engine could never serve (as Engine.check_fits)."""
        check_fits(seq, self.model.shape.max_positions, self.model.max_slots)
        if self._grammars is not None:
            check_grammar(self._grammars, seq)

    def check_admission(self, count: int, tenant: str) -> None:
        """Raise unless ``count`` more sequences of ``tenant`` may wait now: the engine is serving and the
        waiting queue has room.

        The queue is what cannot join the batch at its next step (requests beyond its free rows). Past its
        limit a tenant still gets in while it holds less than its fair share of the limit (the limit over the
        tenants waiting), so one tenant's flood fills the queue for itself, not for everyone; the queue then
        holds at most twice the limit. A request larger than the whole limit gets in when nothing waits."""
        if self.unavailable is not None:
            raise EngineUnavailable(self.unavailable + "; the server cannot serve until it is restarted")
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
            raise EngineUnavailable(self.unavailable)
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

    def _send(self, message: list) -> None:
        self._inputs.send(protocol.pack(message), zmq.NOBLOCK)

    def _abort(self, ids: list[int]) -> None:
        if self.unavailable is None and self._proc is not None and self._proc.poll() is None:
            self._send([protocol.ABORT, ids])

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

    async def _read_outputs(self) -> None:
        while True:
            message = protocol.unpack(await self._outputs.recv())
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
