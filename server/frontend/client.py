"""The engine as the HTTP process sees it: the verbs of :class:`~server.engine.engine.Engine` (``check_fits``,
``submit``, ``cancel``), served by the engine process (:mod:`server.engine.core`).

Each request submitted here is followed by its :class:`~server.frontend.request_state.RequestState`, the
HTTP process's own thin state, from the engine's step outputs
(:class:`~server.frontend.tracker.RequestTracker`,
shared with the in-process :class:`~server.frontend.local_client.LocalEngineClient`): token ids and logprobs,
text from its one detokenizer (a stop string finishes it here and aborts the engine's copy), admission and
finish with the engine's timestamps. The engine never sees text.

Admission control lives here too, where a refusal can still be an HTTP status
(:mod:`server.frontend.admission`): a bounded waiting queue, a request with a ``deadline`` that has not joined
the batch by then leaves the queue unserved (``FinishReason.TIMEOUT``), and a dead, stuck or draining
engine fails what it holds with ``unavailable`` set (503) instead of leaving clients hanging.

Liveness too: an engine process that exits, or stays silent (no step, no heartbeat) for ``stall_timeout``
seconds, is replaced as :class:`~server.frontend.supervisor.RestartPolicy` allows, while requests get 503 with
a ``Retry-After`` of the expected restart time; task tensors are sent again as requests name them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from prefixes.artifact import ModelShape
from server.engine import protocol
from server.engine.core import EngineCoreSpec
from server.engine.engine import RequestInvalid
from server.engine.model import check_supported, resolve_model
from server.engine.sequence import FinishReason
from server.frontend.admission import EngineOverloaded, EngineUnavailable
from server.frontend.grammar_check import GrammarChecker
from server.frontend.prefix_shipping import PrefixShipper
from server.frontend.request_state import RequestObserver, RequestState
from server.frontend.supervisor import EngineProcess, EngineStartFailed, EngineSupervisor
from server.frontend.tracker import RequestTracker

__all__ = ["EngineClient", "EngineLimits", "EngineOverloaded", "EngineUnavailable", "ServedModel"]

log = logging.getLogger(__name__)


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


class EngineClient(RequestTracker):
    def __init__(self, spec: EngineCoreSpec, limits: EngineLimits, observer: RequestObserver | None = None,
                 env: dict[str, str] | None = None, on_restart: Callable[[str], None] | None = None):
        super().__init__(observer, spec.max_batch_size, limits.max_waiting)
        self.spec = spec
        self.limits = limits
        self._model: ServedModel | None = None  # set by start()
        self.draining = False
        # the engine process: started, watched, replaced when it dies or stalls (status, restarts, gave_up)
        self.supervisor = EngineSupervisor(spec, env, limits.stall_timeout, limits.max_restarts,
                                           self._engine_ready, self._engine_lost, on_restart)
        self._prefixes = PrefixShipper(limits.prefix_cache_bytes, self._send)  # the task tensors it holds
        self._reader: asyncio.Task | None = None  # reads the current engine process's outputs
        self._grammars: GrammarChecker | None = None  # set by start()
        self._ipc_dir: Path | None = None  # holds the sockets' files; removed by close()

    @classmethod
    def for_model(cls, model: str, dtype: str, device: str, threads: int, max_batch_size: int,
                  kv_cache_bytes: int, max_step_tokens: int, limits: EngineLimits,
                  observer: RequestObserver | None = None, env: dict[str, str] | None = None,
                  on_restart: Callable[[str], None] | None = None,
                  cache_options: dict | None = None) -> EngineClient:
        folder = Path(tempfile.mkdtemp(prefix="prefix-serve-ipc-"))
        spec = EngineCoreSpec(model=model, dtype=dtype, device=device, threads=threads,
                              max_batch_size=max_batch_size, kv_cache_bytes=kv_cache_bytes,
                              max_step_tokens=max_step_tokens, input_address=f"ipc://{folder}/in",
                              output_address=f"ipc://{folder}/out", parent_pid=os.getpid(),
                              cache_options=dict(cache_options or {}))
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
        self._model = ServedModel(tokenizer, ModelShape(**info["shape"]), info["model_id"],
                                  frozenset(info["eos_token_ids"]), getattr(torch, info["dtype"]),
                                  info["device"], info["max_slots"], info["vocab_size"])
        # Structured-output specs are checked before submission, so a bad schema is a 400 before anything
        # streams; in a child process, so a grammar that crashes the grammar library crashes nothing else.
        self._grammars = GrammarChecker(str(path), info["vocab_size"], frozenset(info["eos_token_ids"]))
        await asyncio.to_thread(self._grammars.start)
        return self._model

    def _engine_ready(self, process: EngineProcess) -> None:
        """A (new) engine process is ready: read its outputs. It holds no task tensors yet: each is sent
        again when a request names it."""
        self._prefixes.forget_all()
        self._reader = asyncio.create_task(self._read_outputs(process), name="engine-outputs")

    def _engine_lost(self, message: str) -> None:
        """The engine process is gone (killed as stuck, or dead): fail everything it held (503)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.num_running = 0
        if self._states:
            log.error("failing %d requests: %s", len(self._states), message)
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

    async def drain(self, timeout: float) -> int:
        """Stop admitting; wait up to ``timeout`` seconds for what is in flight, then fail the rest (503).
        Returns how many were failed."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._states and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self._states)
        if left:
            log.warning("shutdown: %d requests still running after %.0fs; cancelling them", left, timeout)
            self._abort(list(self._states))
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

    @property
    def fit_limits(self) -> tuple[int, int]:
        return self.model.shape.max_positions, self.model.max_slots

    async def check_structured(self, state: RequestState) -> None:
        """Raise :class:`RequestInvalid` when ``state``'s structured output cannot be followed (checked within
        the limits of server/engine/grammar.py, in the grammar checker's process; here only)."""
        if state.params.structured is None:
            return
        error = await self.check_grammar(*state.params.structured)
        if error is not None:
            raise RequestInvalid(error)

    async def check_grammar(self, kind: str, spec: str) -> str | None:
        """None when ``(kind, spec)`` compiles for the served tokenizer within the limits, else why not (for a
        400); compiled in the grammar checker's process, never in this one."""
        return None if self._grammars is None else await self._grammars.check(kind, spec)

    def check_admission(self, count: int, tenant: str) -> None:
        """Raise unless ``count`` more sequences of ``tenant`` may wait now: the engine is serving and the
        waiting queue has room (:meth:`WaitingQueue.check`)."""
        if self.unavailable is not None:
            raise EngineUnavailable(self._unavailable_message(), self.retry_after)
        if self.draining:
            raise EngineUnavailable("the server is shutting down; retry on another replica")
        self._waiting.check(count, tenant, self.num_running)

    def submit(self, state: RequestState) -> None:
        """Queue ``state`` in the engine, after :meth:`check_fits`, :meth:`check_structured` and
        :meth:`check_admission` (not repeated here, nor in the engine)."""
        if self.unavailable is not None:
            raise EngineUnavailable(self._unavailable_message(), self.retry_after)
        ref = self._prefixes.ship(state.prefix) if state.prefix is not None else None
        self._register(state, self.model.tokenizer)
        timeout = self.limits.request_timeout
        if state.deadline is None and timeout is not None:
            state.deadline = state.arrival_time + timeout
        if state.deadline is not None:
            loop = asyncio.get_running_loop()
            self._timers[state.id] = loop.call_at(
                loop.time() + max(0.0, state.deadline - time.monotonic()), self._expire, state
            )
        self._send(protocol.AddRequest(state.id, list(state.prompt_ids), state.params.for_engine(), ref,
                                       state.tenant))

    def _expire(self, state: RequestState) -> None:
        self._timers.pop(state.id, None)
        if state.finished or state.admit_time is not None:
            return
        self._abort([state.id])
        waited = time.monotonic() - state.arrival_time
        self._finish(
            state,
            FinishReason.TIMEOUT,
            f"the request waited {waited:.1f}s for a place in the batch, past "
            "its deadline (timeout / --request-timeout); the server is busy, retry later",
        )

    def _unavailable_message(self) -> str:
        assert self.unavailable is not None, "only while the engine cannot serve"
        if self.supervisor.gave_up:
            return self.unavailable
        return f"{self.unavailable}; a new engine process is starting, retry in {self.retry_after}s"

    def _send(self, message: protocol.ToEngine) -> None:
        process = self.supervisor.process
        if process is None:
            raise EngineUnavailable("the engine process is being replaced", self.retry_after)
        process.send(message)

    def _abort(self, ids: list[int]) -> None:
        process = self.supervisor.process
        if self.unavailable is None and process is not None and process.alive:
            process.send(protocol.Abort(ids))

    # -- outputs ---------------------------------------------------------------------------------------------

    async def _read_outputs(self, process: EngineProcess) -> None:
        while True:
            message = await process.recv()
            self.supervisor.heard()  # any message: the engine's loop is turning
            if isinstance(message, protocol.Heartbeat):
                self.num_running = message.running
            elif not isinstance(message, protocol.StepOutput):
                log.error("unexpected message from the engine: %r", message)
            else:
                try:
                    self._apply(message)
                except Exception:  # a bug here must not stop every later request's outputs
                    log.exception("applying an engine step failed")
