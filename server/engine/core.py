"""The engine process: loads the model, runs :class:`~server.engine.engine.Engine` steps, nothing else.

Started by :class:`server.frontend.client.EngineClient` as ``python -m server.engine.core SPEC_JSON``.
The HTTP process validates, tokenizes, resolves tasks, detokenizes and streams; this process schedules,
computes and samples, on its main thread, so no request handling shares its interpreter (or its GIL) and
the model's threads are the only busy ones here.

It emits token ids and logprobs, never text: detokenizing and stop strings are the HTTP process's, which also
checks every request before sending it (fit, grammar, sampling values), so requests are queued as they come.

Between two steps it takes every message waiting on its input socket (new requests, aborts, task tensors);
after a step it sends one message with every token, finish and admission the step produced, even an empty
one: each step is a heartbeat. When nothing is running it blocks on the socket for up to
:data:`~server.engine.protocol.HEARTBEAT_INTERVAL_S` at a time and sends a HEARTBEAT each time it wakes, so
the HTTP process can tell a stuck engine (no message for ``--engine-stall-timeout`` seconds) from an idle
one. It exits on SHUTDOWN, at once (``os._exit`` after closing its sockets: the interpreter's teardown of
torch took 1.1 s on 2 cores and holds nothing worth tearing down), or by itself when the HTTP process that
started it is gone (so a killed server never leaves an engine holding the GPU).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

import safetensors.torch
import torch
import zmq

from prefixes.artifact import PrefixKind
from server.engine import protocol
from server.engine.engine import Engine, EngineConfig
from server.engine.model import load_base_model
from server.engine.sequence import Sequence
from server.engine.step_events import StepEvents

log = logging.getLogger("prefix_serve.engine_core")

# how often an idle engine wakes to send a heartbeat and look for a vanished parent
IDLE_POLL_MS = int(protocol.HEARTBEAT_INTERVAL_S * 1000)


@dataclass(frozen=True, slots=True)
class EngineCoreSpec:
    """Everything the engine process needs, passed as JSON on its command line."""

    model: str
    dtype: str
    device: str
    threads: int
    max_batch_size: int
    kv_cache_bytes: int
    max_step_tokens: int
    input_address: str  # PULL: requests from the HTTP process
    output_address: str  # PUSH: step outputs to the HTTP process
    parent_pid: int
    # the paged cache's options, EngineConfig's field names: block_size, prefix_caching, share_prefix_cache,
    # long_prefill_threshold, max_long_prefills (absent ones keep EngineConfig's defaults)
    cache_options: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EnginePrefix:
    """A task as the engine needs it: its kind and its tensor on the serving device (prefixes.artifact)."""

    kind: PrefixKind
    tensor: torch.Tensor  # deep: [L, 2, Hkv, P, D]; soft prompt: [P, H]

    @property
    def num_virtual_tokens(self) -> int:
        return self.tensor.shape[3] if self.kind.is_deep else self.tensor.shape[0]


class EngineCore:
    def __init__(self, spec: EngineCoreSpec):
        self.spec = spec
        from server.engine.cpu_linear import resolve_dtype

        torch.set_num_threads(spec.threads or torch.get_num_threads())
        dtype = resolve_dtype(spec.dtype, spec.device, announce=True)
        self.base = load_base_model(spec.model, dtype, spec.device)
        self.events = StepEvents()  # what each step produced, and the sequences it follows
        self.engine = Engine(
            self.base,
            EngineConfig(
                max_batch_size=spec.max_batch_size,
                kv_cache_bytes=spec.kv_cache_bytes,
                max_step_tokens=spec.max_step_tokens,
                **spec.cache_options,
            ),
            observer=self.events,
        )
        # before READY: the first structured request must not pay for the grammar library's one-off work
        self.engine.grammars.warm_up(self.base.device)
        self.prefixes: dict[str, EnginePrefix] = {}
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.connect(spec.input_address)
        self.outbox = self.context.socket(zmq.PUSH)
        self.outbox.connect(spec.output_address)
        self._stopping = False

    def ready_info(self) -> dict:
        shape = self.base.shape
        return {
            "model_id": self.base.model_id,
            "model_type": shape.model_type,
            "shape": {
                "num_layers": shape.num_layers,
                "num_kv_heads": shape.num_kv_heads,
                "head_dim": shape.head_dim,
                "hidden_size": shape.hidden_size,
                "max_positions": shape.max_positions,
                "model_type": shape.model_type,
            },
            "eos_token_ids": sorted(self.base.eos_token_ids),
            "max_slots": self.engine.max_slots,
            "vocab_size": self.engine.sampler.vocab_size,
            "dtype": str(self.base.dtype).removeprefix("torch."),
            "device": str(self.base.device),
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }

    # -- messages --------------------------------------------------------------------------------------------

    def _handle(self, message: protocol.ToEngine) -> None:
        if isinstance(message, protocol.AddRequest):
            self._add(message)
        elif isinstance(message, protocol.Abort):
            for seq_id in message.ids:
                seq = self.events.seqs.get(seq_id)
                if seq is not None:
                    self.engine.cancel(seq)
        elif isinstance(message, protocol.LoadPrefix):
            try:
                tensor = safetensors.torch.load_file(message.path)["tensor"]
            finally:
                os.unlink(message.path)
            self.prefixes[message.ref] = EnginePrefix(
                PrefixKind(message.kind), tensor.to(device=self.base.device, dtype=self.base.dtype)
            )
        elif isinstance(message, protocol.DropPrefix):
            self.prefixes.pop(message.ref, None)
        elif isinstance(message, protocol.Shutdown):
            self._stopping = True

    def _add(self, request: protocol.AddRequest) -> None:
        prefix = self.prefixes.get(request.prefix_ref) if request.prefix_ref is not None else None
        # checked in the HTTP process before it was sent (fit, grammar, sampling values): queued as it is
        seq = Sequence(request.prompt_ids, request.params, prefix, tenant=request.tenant, id=request.id)
        if request.prefix_ref is not None and prefix is None:  # cannot happen: LoadPrefix precedes it
            self.events.reject(seq.id, f"task tensor {request.prefix_ref!r} is not loaded in the engine")
            return
        self.events.track(seq)
        self.engine.enqueue(seq)

    def _receive(self, timeout_ms: int) -> None:
        """Handle every waiting message; wait up to ``timeout_ms`` for the first one."""
        if not self.inbox.poll(timeout_ms):
            return
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(protocol.decode_to_engine(frame))
            except Exception:  # one bad message (a vanished prefix file, say) must not end the engine
                log.exception("could not handle a message from the HTTP process")

    # -- the loop --------------------------------------------------------------------------------------------

    def _send_step(self, heartbeat: bool) -> None:
        """Send what the last step produced; with ``heartbeat``, even when it produced nothing (after a
        step, or an idle wake-up: a HEARTBEAT then), so that silence always means a stuck engine."""
        out = self.events.take(self.engine)
        if out.empty and not out.decoded and not out.running and not out.waiting:
            if heartbeat:
                self.outbox.send(protocol.encode(protocol.Heartbeat(time.monotonic(), 0, 0)))
            return
        self.outbox.send(protocol.encode(out))

    def _step(self) -> None:
        try:
            self.engine.step()
        except (
            Exception
        ) as exc:  # the batch's cache is no longer trusted; its requests fail, the engine goes on
            log.exception("engine step failed; failing the running requests")
            self.engine.fail_running(f"internal engine error: {type(exc).__name__}: {exc}")
        self._send_step(heartbeat=True)

    def run(self) -> None:
        self.outbox.send(protocol.encode(protocol.Ready(self.ready_info())))
        last_beat = time.monotonic()
        while not self._stopping:
            busy = self.engine.num_running or self.engine.num_waiting
            self._receive(0 if busy else IDLE_POLL_MS)
            if self._stopping:
                break
            if os.getppid() != self.spec.parent_pid:
                log.error("the HTTP process is gone; the engine exits")
                break
            if self.engine.num_running or self.engine.num_waiting:
                self._step()
                last_beat = time.monotonic()
            else:  # idle: what aborts produced, and a heartbeat when one is due (messages can keep it awake)
                due = time.monotonic() - last_beat >= protocol.HEARTBEAT_INTERVAL_S
                self._send_step(heartbeat=due)
                last_beat = time.monotonic() if due else last_beat
        # Nobody waits for outputs once SHUTDOWN is sent (or the parent is gone): nothing needs to linger.
        self.outbox.close(linger=0)
        self.inbox.close(linger=0)
        self.context.term()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    spec = EngineCoreSpec(**json.loads(argv[0]))
    try:
        core = EngineCore(spec)
    except Exception as exc:  # tell the HTTP process why, then exit non-zero
        log.exception("engine start-up failed")
        context = zmq.Context()
        out = context.socket(zmq.PUSH)
        out.connect(spec.output_address)
        out.send(protocol.encode(protocol.Fatal(f"{type(exc).__name__}: {exc}")))
        out.close(linger=2000)
        context.term()
        return 1
    core.run()
    return 0


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown (1.1 s of freeing torch and its modules, measured on 2 cores):
    the sockets are closed and the model holds nothing that must be written out; only the logs are flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
