"""The engine as the HTTP process sees it: the verbs of :class:`~server.engine.engine.Engine` (``check_fits``,
``submit``, ``cancel``), served by the engine process (:mod:`server.engine.core`).

Each request submitted here is followed by its :class:`~server.engine.request_state.RequestState`, the
HTTP process's own thin state: the engine's step outputs (token ids, logprobs, admission and finish, with
the engine's timestamps) are added to it, its detokenizer turns the ids into text and looks for stop
strings (a hit finishes the request here at once and aborts the engine's copy), and its ``on_token`` /
``on_finish`` callbacks run on the event loop. The engine never sees text.

Admission control lives here too, where a refusal can still be an HTTP status
(:mod:`server.engine.admission`): a bounded waiting queue, a request with a ``deadline`` that has not joined
the batch by then leaves the queue unserved (``FinishReason.TIMEOUT``), and a dead, stuck or draining
engine fails what it holds with ``unavailable`` set (503) instead of leaving clients hanging.

Liveness too: an engine process that exits, or stays silent (no step, no heartbeat) for ``stall_timeout``
seconds, is replaced as :class:`~server.engine.supervisor.RestartPolicy` allows, while requests get 503 with
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
from server.engine.admission import EngineOverloaded, EngineUnavailable, WaitingQueue
from server.engine.core import EngineCoreSpec
from server.engine.detokenizer import Detokenizer
from server.engine.engine import RequestInvalid, check_fits
from server.engine.grammar_check import GrammarChecker
from server.engine.model import check_supported, resolve_model
from server.engine.prefix_shipping import PrefixShipper
from server.engine.request_state import RequestObserver, RequestState
from server.engine.sequence import FinishReason
from server.engine.supervisor import EngineProcess, EngineStartFailed, EngineSupervisor

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


class EngineClient:
    def __init__(self, spec: EngineCoreSpec, limits: EngineLimits, observer: RequestObserver | None = None,
                 env: dict[str, str] | None = None, on_restart: Callable[[str], None] | None = None):
        self.spec = spec
        self.limits = limits
        self.observer = observer or RequestObserver()
        self._model: ServedModel | None = None  # set by start()
        self.num_running = 0  # as of the engine's last step
        self._waiting = WaitingQueue(spec.max_batch_size, limits.max_waiting)  # submitted, not in the batch
        self.draining = False
        self._kv_totals = [0, 0, 0]  # the engine's cumulative prefix-cache queries, hits, preemptions
        # the engine process: started, watched, replaced when it dies or stalls (status, restarts, gave_up)
        self.supervisor = EngineSupervisor(spec, env, limits.stall_timeout, limits.max_restarts,
                                           self._engine_ready, self._engine_lost, on_restart)
        self._states: dict[int, RequestState] = {}  # every unfinished request, by id
        self._prefixes = PrefixShipper(limits.prefix_cache_bytes, self._send)  # the task tensors it holds
        self._reader: asyncio.Task | None = None  # reads the current engine process's outputs
        self._timers: dict[int, asyncio.TimerHandle] = {}
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

    @property
    def num_in_flight(self) -> int:
        return len(self._states)

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
    def num_waiting(self) -> int:
        """Requests submitted here that have not joined the batch."""
        return self._waiting.num_waiting

    def check_fits(self, state: RequestState) -> None:
        """Raise :class:`RequestInvalid` for a request the engine could never serve (too long). Checked here
        only, before submission: the engine process queues what it is sent."""
        check_fits(len(state.prompt_ids), state.prefix, state.params.max_new_tokens,
                   self.model.shape.max_positions, self.model.max_slots)

    async def check_structured(self, state: RequestState) -> None:
        """Raise :class:`RequestInvalid` when ``state``'s structured output cannot be followed (checked within
        the limits of server/engine/grammar.py, in the grammar checker's process; here only)."""
        if state.params.structured is None or self._grammars is None:
            return
        error = await self._grammars.check(*state.params.structured)
        if error is not None:
            raise RequestInvalid(error)

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
        params = state.params
        state.detokenizer = Detokenizer(self.model.tokenizer, params.stop, params.stop_token_ids,
                                        params.min_tokens)
        self._states[state.id] = state
        self._count_waiting(state, +1)
        timeout = self.limits.request_timeout
        if state.deadline is None and timeout is not None:
            state.deadline = state.arrival_time + timeout
        if state.deadline is not None:
            loop = asyncio.get_running_loop()
            self._timers[state.id] = loop.call_at(
                loop.time() + max(0.0, state.deadline - time.monotonic()), self._expire, state
            )
        self._send(protocol.AddRequest(state.id, list(state.prompt_ids), params.for_engine(), ref,
                                       state.tenant, state.arrival_time))

    def cancel(self, state: RequestState) -> None:
        """Stop ``state``: the engine finishes it as cancelled at its next step (``on_finish`` runs then)."""
        if state.id in self._states:
            self._abort([state.id])

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

    def _apply(self, out: protocol.StepOutput) -> None:
        now = out.time
        self.num_running = out.running
        admitted = [self._states[i] for i in out.admitted if i in self._states]
        for state in admitted:
            state.admit_time = now
            self._count_waiting(state, -1)
            timer = self._timers.pop(state.id, None)
            if timer is not None:
                timer.cancel()
        if admitted:
            self.observer.admitted(admitted, now)
        if out.decoded:
            self.observer.decoded(out.decoded)
        self._apply_cache(out)
        for scored in out.prompt_logprobs:
            if (scoring := self._states.get(scored.id)) is not None:
                scoring.prompt_logprobs.extend(scored.entries)
        self._apply_tokens(out.tokens, now)
        for done in out.finished:
            if (finished := self._states.get(done.id)) is not None:
                self._finish(finished, FinishReason(done.reason), done.error)

    def _apply_tokens(self, tokens: list[protocol.NewToken], now: float) -> None:
        touched = []
        for new in tokens:
            state = self._states.get(new.id)
            if state is None:
                continue  # finished here already (stop string, deadline): the engine's extra token is dropped
            self.observer.token(state, now)
            state.last_token_time = now
            if new.logprobs is not None:  # before the id: whoever sees the id sees its logprob
                state.output_logprobs.append(new.logprobs)
            state.output_ids.append(new.token)
            assert state.detokenizer is not None, "set when submitted"
            if state.detokenizer.feed((new.token,)):  # a stop string: done here, the engine's copy aborted
                self._abort([state.id])
                self._finish(state, FinishReason.STOP)
            else:
                touched.append(state)
        for state in touched:
            if state.on_token is not None and not state.finished:
                _call(state.on_token, state)

    def _apply_cache(self, out: protocol.StepOutput) -> None:
        for seq_id, tokens in out.cached:
            if (state := self._states.get(seq_id)) is not None:
                state.num_cached_tokens = tokens
        for seq_id, tokens in out.prefilled:
            if (state := self._states.get(seq_id)) is not None:
                self.observer.prefilled(state, tokens)
        if out.kv is not None:
            totals = [out.kv.queries, out.kv.hits, out.kv.preemptions]
            # a new engine process counts from 0 again
            deltas = [t - last if t >= last else t for t, last in zip(totals, self._kv_totals)]
            self._kv_totals = totals
            self.observer.cache_stats(out.kv.usage, *deltas)

    def _finish(
        self, state: RequestState, reason: FinishReason, error: str | None = None, unavailable: bool = False
    ) -> None:
        if self._states.pop(state.id, None) is None:
            return
        if state.admit_time is None:
            self._count_waiting(state, -1)
        timer = self._timers.pop(state.id, None)
        if timer is not None:
            timer.cancel()
        if state.detokenizer is not None:
            state.detokenizer.close()
        state.finish_reason, state.error, state.unavailable = reason, error, unavailable
        self.observer.finished(state, time.monotonic())
        if state.on_finish is not None:
            _call(state.on_finish, state)

    def _count_waiting(self, state, delta: int) -> None:
        self._waiting.count(state.tenant, delta)

    def _fail_all(self, message: str) -> None:
        for state in list(self._states.values()):
            self._finish(state, FinishReason.ERROR, message, unavailable=True)


def _call(callback: Callable[[], None], state: RequestState) -> None:
    try:
        callback()
    except Exception:  # a broken callback must not stop the outputs of everyone else
        log.exception("callback %s failed for request %s", callback, state.id)
