"""Keeping an engine process alive: starting one, stopping it fast, and when to replace a dead or stuck one.

:class:`EngineProcess` is one engine process (``python -m server.engine.core``) with the two ZeroMQ sockets
to it, bound afresh for each process so that nothing a dead engine left half-sent reaches its successor.
:class:`RestartPolicy` decides whether and when a replacement starts: at once the first time, then after a
doubling backoff, and never more than ``max_per_minute`` times in any 60 seconds (past that the server gives
up, reports ``engine_down`` and exits non-zero, so an orchestrator takes over). :class:`EngineClient`
(:mod:`server.engine.client`) runs the watch that uses both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import zmq
import zmq.asyncio

from server.engine import protocol
from server.engine.core import EngineCoreSpec

log = logging.getLogger(__name__)

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
                message = protocol.unpack(await self._outputs.recv())
                if message[0] == protocol.READY:
                    break
                if message[0] == protocol.FATAL:
                    await self.stop()
                    raise EngineStartFailed(f"the engine process could not start: {message[1]}")
            if self._proc.poll() is not None:
                raise EngineStartFailed(
                    f"the engine process exited with code {self._proc.returncode} during start-up"
                )
            if time.monotonic() > deadline:
                self.kill()
                await self.wait()
                raise EngineStartFailed(f"the engine process was not ready after {timeout:.0f}s")
        self.info = message[1]
        self.start_seconds = time.monotonic() - began
        return self.info

    def send(self, message: list) -> None:
        self._inputs.send(protocol.pack(message), zmq.NOBLOCK)

    async def recv(self) -> list:
        return protocol.unpack(await self._outputs.recv())

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
            self.send([protocol.SHUTDOWN])
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
