"""Keeping an engine process alive: starting one, stopping it fast, and when to replace a dead or stuck one.

:class:`EngineProcess` is one engine process (``python -m server.engine.core``) with the two ZeroMQ sockets
to it, bound afresh for each process so that nothing a dead engine left half-sent reaches its successor.
:class:`RestartPolicy` decides whether and when a replacement starts: at once the first time, then after a
doubling backoff, and never more than ``max_per_minute`` times in any 60 seconds (past that the server gives
up, reports ``engine_down`` and exits non-zero, so an orchestrator takes over). :class:`EngineSupervisor`
runs the watch that uses both, for :class:`~server.frontend.client.EngineClient`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import zmq
import zmq.asyncio

from server.engine import protocol
from server.engine.core import EngineCoreSpec
from server.errors import RETRY_AFTER_S

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2  # how often the engine process's liveness is checked
LOOP_LAG_S = 1.0  # a watch tick this late means this process's own loop was blocked, not the engine

RESTART_WINDOW_S = 60.0  # the window --engine-max-restarts counts in
BACKOFF_FIRST_S = 1.0  # the second restart within the window waits this long; each later one twice the last
BACKOFF_MAX_S = 8.0
STOP_WAIT_S = 3.0  # after SHUTDOWN, how long the engine may take (an idle one exits in milliseconds; a busy
# one ends its step first) before it is killed


class EngineStartFailed(RuntimeError):
    """The engine process exited, refused its model, or was not ready in time during start-up."""


@dataclass(slots=True)
class RestartPolicy:
    """When to start a replacement engine: ``delay()`` seconds from now, or None to give up.

    Restarts within the last :data:`RESTART_WINDOW_S` seconds are counted: the first waits nothing (a crash
    while idle costs one engine start), the k-th waits ``BACKOFF_FIRST_S * 2**(k-2)`` up to ``BACKOFF_MAX_S``
    (an engine that dies at start-up, or one request that kills every engine it reaches, does not spin), and
    once ``max_per_minute`` restarts are in the window the next one is refused."""

    max_per_minute: int
    _starts: deque[float] = field(default_factory=deque)

    def delay(self, now: float) -> float | None:
        while self._starts and now - self._starts[0] >= RESTART_WINDOW_S:
            self._starts.popleft()
        recent = len(self._starts)
        if recent >= self.max_per_minute:
            return None
        return 0.0 if recent == 0 else min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (recent - 1))

    def started(self, at: float) -> None:
        """A replacement was started at ``at`` (after its delay)."""
        self._starts.append(at)

    @property
    def recent(self) -> int:
        return len(self._starts)


class EngineProcess:
    """One engine process and its sockets: PUSH requests to it, PULL its step outputs and heartbeats."""

    def __init__(self, spec: EngineCoreSpec, env: dict[str, str] | None):
        self.spec = spec
        self.env = env
        self._zmq = zmq.asyncio.Context()
        self._outputs = self._zmq.socket(zmq.PULL)
        self._outputs.bind(spec.output_address)
        self._inputs = self._zmq.socket(zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the engine reads everything each step
        self._inputs.bind(spec.input_address)
        self._proc: subprocess.Popen | None = None
        self.info: dict = {}  # what the engine said when ready (pid, threads, device, shape, ...)
        self.start_seconds = 0.0  # spawn to ready, as measured by start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """None while the process runs (or before it is spawned)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def start(self, timeout: float) -> dict:
        """Spawn the process and wait until its model is loaded; its READY info, or EngineStartFailed."""
        began = time.monotonic()
        # A plain Popen on purpose (it returns once the child is spawned): the process is polled from sync
        # code and waited for in a thread, which an asyncio subprocess would not allow.
        self._proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "server.engine.core", json.dumps(asdict(self.spec))],
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        deadline = began + timeout
        while True:
            if await self._outputs.poll(500):
                message = protocol.decode_from_engine(await self._outputs.recv())
                if isinstance(message, protocol.Ready):
                    break
                if isinstance(message, protocol.Fatal):
                    await self.stop()
                    raise EngineStartFailed(f"the engine process could not start: {message.message}")
            if self._proc.poll() is not None:
                raise EngineStartFailed(
                    f"the engine process exited with code {self._proc.returncode} during start-up"
                )
            if time.monotonic() > deadline:
                self.kill()
                await self.wait()
                raise EngineStartFailed(f"the engine process was not ready after {timeout:.0f}s")
        self.info = message.info
        self.start_seconds = time.monotonic() - began
        return self.info

    def send(self, message: protocol.ToEngine) -> None:
        self._inputs.send(protocol.encode(message), zmq.NOBLOCK)

    async def recv(self) -> protocol.FromEngine:
        return protocol.decode_from_engine(await self._outputs.recv())

    def kill(self) -> None:
        if self.alive:
            assert self._proc is not None
            self._proc.kill()  # SIGKILL also ends a SIGSTOPped process

    async def wait(self) -> None:
        if self._proc is not None:
            await asyncio.to_thread(self._proc.wait)

    async def stop(self, wait: float = STOP_WAIT_S) -> None:
        """Ask the process to exit (SHUTDOWN); kill it if it has not within ``wait`` seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self.send(protocol.Shutdown())
            try:
                await asyncio.to_thread(proc.wait, wait)
            except subprocess.TimeoutExpired:
                log.warning("the engine process did not exit %.0fs after SHUTDOWN; killing it", wait)
                proc.kill()
        await self.wait()

    def close(self) -> None:
        """Close the sockets (after the process is gone)."""
        for sock in (self._inputs, self._outputs):
            sock.close(linger=0)
        self._zmq.term()


class EngineSupervisor:
    """Keeps one engine process serving: starts it, watches it, and replaces it when it exits or stays
    silent (no step output, no heartbeat) for ``stall_timeout`` seconds.

    It knows nothing of requests: ``on_ready(process)`` runs when a process is ready (read its outputs,
    forget what the old one held), ``on_lost(message)`` when one is gone (fail what it held, with
    ``message``), and ``on_restart(cause)`` as each replacement starts (``exited``, ``stalled``,
    ``start_failed``: the metrics). While it cannot serve, :attr:`unavailable` says why and :attr:`status`
    is ``engine_stalled`` or ``engine_restarting`` (:attr:`retry_after`: the seconds until the replacement
    should be ready) or, once :class:`RestartPolicy` refuses, ``engine_down`` for good (:attr:`gave_up`)."""

    def __init__(
        self,
        spec: EngineCoreSpec,
        env: dict[str, str] | None,
        stall_timeout: float,
        max_restarts: int,
        on_ready: Callable[[EngineProcess], None],
        on_lost: Callable[[str], None],
        on_restart: Callable[[str], None] | None = None,
    ):
        self.spec, self.env, self.stall_timeout = spec, env, stall_timeout
        self.on_ready, self.on_lost, self.on_restart = on_ready, on_lost, on_restart
        self.policy = RestartPolicy(max_restarts)
        self.process: EngineProcess | None = None
        self.info: dict = {}  # what the engine process said when ready (pid, threads, device, ...)
        self.unavailable: str | None = None  # why the engine cannot serve, while it cannot
        self.status = "ok"  # or engine_stalled / engine_restarting / engine_down
        self.gave_up = False
        self.restarts = 0  # replacement processes started
        self.stopping = False  # set on shutdown: a process that goes away then is not replaced
        self._start_timeout = 900.0
        self._start_seconds = 0.0  # the last process's spawn to ready
        self._ready_expected_at = 0.0  # while replacing: when the new process should be serving
        self._last_heard = 0.0  # monotonic time of the engine's last message
        self._watcher: asyncio.Task | None = None

    async def start(self, timeout: float) -> dict:
        """Start the first engine process (its READY info, or EngineStartFailed) and watch it."""
        self._start_timeout = timeout
        info = await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name="engine-watch")
        return info

    def heard(self) -> None:
        """The engine sent something: its loop is turning."""
        self._last_heard = time.monotonic()

    @property
    def retry_after(self) -> int | None:
        """Seconds until a replacement should be serving (at least 1); None once down for good; while
        serving, the generic second."""
        if self.gave_up:
            return None
        if self.unavailable is None:
            return RETRY_AFTER_S
        return max(1, math.ceil(self._ready_expected_at - time.monotonic()))

    async def stop(self) -> None:
        """Stop watching and stop the process (an idle one exits within milliseconds of SHUTDOWN)."""
        self.stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        process, self.process = self.process, None
        if process is not None:
            await process.stop()
            process.close()

    async def _spawn(self) -> dict:
        process = self.process = EngineProcess(self.spec, self.env)
        try:
            info = await process.start(self._start_timeout)
        except BaseException:
            self.process = None
            process.kill()
            await process.wait()
            process.close()
            raise
        self.info = info
        self._start_seconds = process.start_seconds
        self.heard()
        self.on_ready(process)
        log.info("engine process %d ready in %.1fs: %s on %s, %d threads", info["pid"],
                 process.start_seconds, info["model_id"], info["device"], info["threads"])
        return info

    async def _watch(self) -> None:
        tick = time.monotonic()
        while not self.gave_up:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            if now - tick > WATCH_INTERVAL_S + LOOP_LAG_S:
                # This process's own loop was blocked (outputs may be waiting unread): the silence is ours.
                self._last_heard = max(self._last_heard, now)
            tick = now
            process = self.process
            if process is None or self.stopping:
                continue
            code = process.returncode
            if code is not None:
                await self._replace(f"the engine process exited unexpectedly (code {code})", "exited")
            elif now - self._last_heard > self.stall_timeout:
                silent = now - self._last_heard
                await self._replace(f"the engine process made no progress for {silent:.0f}s "
                                    f"(--engine-stall-timeout {self.stall_timeout:g})", "stalled")

    async def _replace(self, reason: str, cause: str) -> None:
        """Kill the process, then start replacements until one is ready or the policy gives up."""
        self.status = "engine_stalled" if cause == "stalled" else "engine_restarting"
        process, self.process = self.process, None
        while not self.stopping:
            self.unavailable = reason
            delay = self.policy.delay(time.monotonic())
            if delay is None:
                self._give_up(reason)
            else:
                self._ready_expected_at = time.monotonic() + delay + self._start_seconds
                log.error("%s; a new engine process starts in %.0fs", reason, delay)
                self.on_lost(f"{reason}; a new engine process is starting, retry in {self.retry_after}s")
            if process is not None:  # after on_lost: nothing reads its sockets any more
                process.kill()  # SIGKILL: it may be stopped or spinning
                await process.wait()
                process.close()  # its successor binds the same socket paths
                process = None
            if delay is None:
                return
            await asyncio.sleep(delay)
            if self.stopping:
                return
            self.policy.started(time.monotonic())
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart(cause)
            try:
                await self._spawn()
            except EngineStartFailed as exc:
                reason, cause = f"a replacement engine process failed: {exc}", "start_failed"
                self.status = "engine_restarting"
                continue
            self.unavailable, self.status = None, "ok"
            log.warning("the engine process was replaced (%d replacements so far)", self.restarts)
            return

    def _give_up(self, reason: str) -> None:
        self.gave_up, self.status = True, "engine_down"
        self.unavailable = (
            f"{reason}; the engine was replaced {self.policy.recent} times in the last minute "
            f"(--engine-max-restarts {self.policy.max_per_minute}): the server gives up and exits"
        )
        log.critical("%s", self.unavailable)
        self.on_lost(self.unavailable)
