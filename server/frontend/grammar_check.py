"""Structured-output grammars checked in a child process of the HTTP process, so native code cannot take the
server down.

llguidance compiles grammars in native code. The limits in :mod:`server.engine.grammar` refuse the
inputs known to exhaust it (a 5,000-rule Lark chain segfaulted whichever process compiled it), but a crash
they do not foresee must cost one request, not every request in flight: the HTTP process never compiles a
request's grammar, nor a tool's parameter schema (server/api/tools.py), itself. It sends ``(kind, spec)`` to
this worker and waits; a worker that dies or takes longer than ``timeout`` seconds is replaced, and that
request gets a 400 saying so. The engine compiles only grammars that passed here. Verdicts are remembered
(an LRU keyed by a digest of the spec), so a client that sends the same tool schemas or response format on
every request pays for one compile, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 10.0
VERDICTS_KEPT = 1024  # (kind, spec digest) -> verdict; a verdict is a few hundred bytes at most


def _worker(conn: Connection, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int]) -> None:
    from transformers import AutoTokenizer

    from server.engine.grammar import WARM_UP_GRAMMAR, Grammars, InvalidGrammar

    grammars = Grammars(AutoTokenizer.from_pretrained(tokenizer_path), vocab_size, frozenset(eos_token_ids))
    grammars.check(WARM_UP_GRAMMAR)  # the token table and a first compile now, before a request waits on them
    conn.send(("ready", None))
    while True:
        try:
            kind, spec = conn.recv()
        except EOFError:  # the HTTP process is gone
            return
        try:
            grammars.check((kind, spec))
            conn.send(("ok", None))
        except InvalidGrammar as exc:
            conn.send(("invalid", str(exc)))
        except Exception as exc:  # noqa: BLE001 - whatever the grammar library raises is about this grammar
            conn.send(("invalid", f"invalid {kind} for structured output: {exc}"))


class GrammarChecker:
    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: frozenset[int],
                 timeout: float = CHECK_TIMEOUT_S):
        self._args = (tokenizer_path, vocab_size, sorted(eos_token_ids))
        self.timeout = timeout
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()  # requests queue here, in order
        # One exchange on the pipe at a time even when a waiting coroutine was cancelled: its thread still
        # owns the pipe until the reply is read, and the next check must not read that reply as its own.
        self._pipe = threading.Lock()
        self._verdicts: OrderedDict[tuple[str, bytes], str | None] = OrderedDict()
        self.restarts = 0

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the HTTP process runs threads
        parent, child = context.Pipe()
        self._proc = context.Process(target=_worker, args=(child, *self._args), daemon=True,
                                     name="prefix-serve-grammar-check")
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(120) or parent.recv()[0] != "ready":
            self._stop()  # a late "ready" must never be read later as a check's answer
            raise RuntimeError("the grammar checker process did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def start(self) -> None:
        started = time.monotonic()
        self._spawn()
        log.info("grammar checker ready in %.1fs (its token table built and a JSON schema checked)",
                 time.monotonic() - started)

    def close(self) -> None:
        self._stop()

    def _check(self, kind: str, spec: str) -> tuple[str | None, bool]:
        """The verdict (None: it compiles) and whether it is the grammar's own (kept), not a timeout's."""
        with self._pipe:
            if self._proc is None or not self._proc.is_alive():
                self._stop()
                self._spawn()
            assert self._conn is not None and self._proc is not None, "spawned above"
            self._conn.send((kind, spec))
            if not self._conn.poll(self.timeout):
                self._stop()
                self.restarts += 1
                return (f"checking this {kind} for structured output took over {self.timeout:.0f} s; "
                        "simplify it"), False  # a busy machine can cause it: asked again next time
            try:
                status, message = self._conn.recv()
            except EOFError:
                self._proc.join(5)
                code = self._proc.exitcode
                log.error("the grammar checker died on a %s (exit code %s); starting another", kind, code)
                self._stop()
                self.restarts += 1
                return (f"this {kind} crashed the grammar library while it was checked (exit code {code}); "
                        "the server is unaffected. Simplify it: fewer rules, less nesting."), True
            if status not in ("ok", "invalid"):
                raise RuntimeError(f"the grammar checker answered {status!r} to a check")
            return (message if status == "invalid" else None), True

    async def check(self, kind: str, spec: str) -> str | None:
        """None when ``(kind, spec)`` compiles for the served tokenizer, else why not (for a 400)."""
        key = (kind, hashlib.blake2b(spec.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        async with self._lock:  # one worker, one grammar at a time
            verdict, keep = await asyncio.to_thread(self._check, kind, spec)
        if keep:
            self._verdicts[key] = verdict
            if len(self._verdicts) > VERDICTS_KEPT:
                self._verdicts.popitem(last=False)
        return verdict
