"""The shared Redis tier's connection: reads, atomic writes (see :mod:`prefixes.store.redis_layout`) and
the pub/sub listener. One Redis, many serving replicas.

Failure handling: every call has short socket timeouts and one immediate retry on a fresh connection
(a pooled connection may be stale after a Redis restart). A call that still fails raises
:class:`RedisUnavailable` and opens a breaker (``retry_after`` seconds, doubling up to ``max_retry_after``
while Redis stays down) during which calls fail fast, so a dead Redis costs a request nothing (the store
then serves from memory and local disk); the first call after it, or the listener's resubscription,
closes it again. The listener thread (pub/sub) reconnects by itself with exponential backoff and tells the
store each time it is subscribed again, which is when the store reconciles its local disk with Redis (see
:mod:`prefixes.store.sync`); it also calls the store's periodic reconciliation every ``reconcile_interval``
seconds, which notices what Redis lost while the connection stayed up (FLUSHALL, eviction, a failover).

Redis answering "out of memory" (``maxmemory``) or "read-only" (a replica) is not an outage: Redis is
there and serves reads, so the breaker stays closed and the write is refused (:class:`RedisRefused`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from prefixes.store.errors import Quota
from prefixes.store.redis_layout import (
    ALLOCATE,
    BACKFILL_OWNED,
    DEFAULT_KEY_PREFIX,
    DELETE,
    FIELDS,
    PUBLISH,
    TOMBSTONE,
    Layout,
    RemoteState,
    parse_state,
    redact,
)

log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    """Redis could not be reached (or answered with an error); the caller falls back to local tiers."""


class RedisRefused(RuntimeError):
    """Redis answered but refused a write: out of memory or read-only (the subclasses)."""


class RedisOutOfMemory(RedisRefused):
    """``OOM command not allowed when used memory > 'maxmemory'``."""


class RedisReadOnly(RedisRefused):
    """``READONLY You can't write against a read only replica``."""


class QuotaRefused(Exception):
    """Redis refused a write under a quota: the namespace's other live tasks and their bytes."""

    def __init__(self, other_tasks: int, other_bytes: int):
        super().__init__(f"{other_tasks} other tasks of {other_bytes} bytes")
        self.other_tasks = other_tasks
        self.other_bytes = other_bytes


class RedisTier:
    def __init__(self, url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX, socket_timeout: float = 0.25,
                 retry_after: float = 0.5, max_retry_after: float = 5.0, max_backoff: float = 2.0,
                 reconcile_interval: float = 5.0):
        self.url = redact(url)  # for messages; the client gets the real one
        self.key_prefix = key_prefix
        self.layout = Layout(key_prefix)
        self.channel = self.layout.channel
        self.origin = uuid.uuid4().hex  # this replica: it ignores its own events
        self.retry_after = retry_after  # the breaker's first pause; it doubles while Redis stays down
        self.max_retry_after = max_retry_after
        self.max_backoff = max_backoff  # the listener's longest wait between reconnection attempts
        self.reconcile_interval = reconcile_interval  # seconds between the listener's periodic reconciles
        # Short timeouts: Redis is a cache in front of the local disk, never worth stalling a request for.
        # One immediate retry on a new connection absorbs a pooled connection made stale by a restart; a
        # timeout is not retried (a hung Redis would only stall the request twice as long).
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)), health_check_interval=0,
            client_name=f"prefix-serve-{self.origin[:8]}")
        # The listener's own client, without retries: redis-py would otherwise reconnect a dropped
        # subscription silently, and the events missed meanwhile would go unnoticed (no reconciliation).
        self._events_client = redis.Redis.from_url(
            url, socket_timeout=max(socket_timeout, 2.0), socket_connect_timeout=max(socket_timeout, 1.0),
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
            client_name=f"prefix-serve-{self.origin[:8]}-events")
        self._allocate = self.client.register_script(ALLOCATE)
        self._publish = self.client.register_script(PUBLISH)
        self._delete = self.client.register_script(DELETE)
        self._backfill_owned = self.client.register_script(BACKFILL_OWNED)
        self._tombstone = self.client.register_script(TOMBSTONE)
        self._down_until = 0.0
        self._down_pause = retry_after
        self._down_logged = False
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._recovered = threading.Event()  # Redis answered again after failing: reconcile (listener)
        self.connects = 0  # successful (re)subscriptions of the listener
        self.reconciles = 0  # periodic reconciliations run by the listener
        self.events = 0  # events from other replicas handled

    # -- availability ---------------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the breaker is open (a recent call failed): calls then fail fast."""
        return time.monotonic() >= self._down_until

    @property
    def retry_in(self) -> float:
        """Seconds until the breaker lets calls through again (0 when it is closed)."""
        return max(0.0, self._down_until - time.monotonic())

    def _call(self, what: str, fn: Callable):
        if not self.available:
            raise RedisUnavailable(f"Redis at {self.url} is unreachable (retrying shortly)")
        try:
            result = fn()
        except (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError) as exc:
            self._mark_up()  # Redis answered: reads still work, only this write is refused
            oom = isinstance(exc, redis.exceptions.OutOfMemoryError)
            raise (RedisOutOfMemory if oom else RedisReadOnly)(f"Redis at {self.url} refused {what}: {exc}") \
                from exc
        except redis.RedisError as exc:
            self._mark_down(what, exc)
            raise RedisUnavailable(f"Redis at {self.url}: {what} failed: {exc}") from exc
        self._mark_up()
        return result

    def _mark_down(self, what: str, exc: Exception) -> None:
        self._down_until = time.monotonic() + self._down_pause
        self._down_pause = min(self._down_pause * 2, self.max_retry_after)
        if not self._down_logged:
            self._down_logged = True
            log.warning("Redis at %s unreachable (%s: %s): serving from memory and local disk until it is "
                        "back", self.url, what, exc)

    def _mark_up(self) -> None:
        self._down_until = 0.0
        self._down_pause = self.retry_after
        if self._down_logged:
            self._down_logged = False
            self._recovered.set()
            log.info("Redis at %s reachable again", self.url)

    # -- reads ----------------------------------------------------------------------------------------------

    def probe(self, key: str) -> RemoteState | None:
        """The key's version, digest and record (no tensor data); None when Redis has never heard of it."""
        return self._call("probe", lambda: parse_state(self.client.hmget(self.layout.task(key), FIELDS)))

    def probe_many(self, keys: Iterable[str]) -> dict[str, RemoteState | None]:
        keys = list(keys)

        def run():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self.layout.task(key), FIELDS)
            return {key: parse_state(values) for key, values in zip(keys, pipe.execute())}

        return self._call("probe", run) if keys else {}

    def fetch(self, key: str) -> tuple[RemoteState, bytes] | None:
        """The live version's state and its safetensors bytes, read together; None when not live."""
        values = self._call("fetch", lambda: self.client.hmget(self.layout.task(key), (*FIELDS, "data")))
        state = parse_state(values)
        if state is None or state.deleted or values[-1] is None:
            return None
        return state, values[-1]

    def live_keys(self) -> set[str]:
        """Keys of every live task."""
        return {k.decode() for k in self._call("list", lambda: self.client.smembers(self.layout.tasks))}

    def totals(self) -> tuple[int, int]:
        """(bytes, tasks) held live in Redis."""
        def run():
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.layout.bytes)
            pipe.scard(self.layout.tasks)
            return pipe.execute()

        nbytes, count = self._call("stats", run)
        return int(nbytes or 0), int(count)

    # -- writes ---------------------------------------------------------------------------------------------

    def backfill_owned(self) -> int:
        """Put live tasks that predate the per-namespace quota index into it; how many were missing."""
        return int(self._call("backfill", lambda: self._backfill_owned(keys=[self.layout.tasks],
                                                                        args=[self.layout.prefix])))

    def allocate(self, key: str, floor: int = 0) -> int:
        """A new version number for ``key``, unique across replicas and above ``floor``."""
        keys = [self.layout.seq(key), self.layout.task(key)]
        return int(self._call("allocate", lambda: self._allocate(keys=keys, args=[floor])))

    def publish(self, record: dict[str, Any], data: bytes, owner: str | None,
                quota: Quota | None = None) -> bool:
        """Make ``record`` (TaskRecord.as_json) with tensor file ``data`` current, unless Redis already has
        that version or a newer one (False). ``owner``: the task's namespace (None: single-user). Under a
        ``quota`` the namespace's live tasks are counted in the same script: QuotaRefused when over."""
        key = record["task"]
        limits = ("" if n is None else n for n in (quota.max_tasks, quota.max_bytes)) if quota else ("", "")
        args: list[str | int | bytes] = [
            key, record["version"], record["sha256"], owner or "", json.dumps(record), data,
            repr(float(record["created_at"])), record["bytes"], self.channel, self.origin, *limits]
        keys = self.layout.writes(key)
        written, *others = self._call("publish", lambda: self._publish(keys=keys, args=args))
        if written < 0:
            raise QuotaRefused(*others)
        return bool(written)

    def delete(self, key: str, floor: int = 0, force: bool = False, at: float | None = None) -> int | None:
        """Tombstone ``key``; returns the tombstone's version, None when Redis had no live task (and not
        ``force``)."""
        keys = self.layout.writes(key)
        args: list[str | int] = [key, floor, "1" if force else "0", repr(time.time() if at is None else at),
                                 self.channel, self.origin]
        version = int(self._call("delete", lambda: self._delete(keys=keys, args=args)))
        return None if version < 0 else version

    def tombstone(self, key: str, version: int, at: float) -> bool:
        """Put back a delete Redis lost: a tombstone of ``version``, unless Redis has it or a newer one."""
        keys = self.layout.writes(key)
        args: list[str | int] = [key, version, repr(float(at)), self.channel, self.origin]
        return bool(self._call("tombstone", lambda: self._tombstone(keys=keys, args=args)))

    # -- pub/sub listener -----------------------------------------------------------------------------------

    def start_listener(self, on_event: Callable[[str, str, int], None], on_connected: Callable[[], None],
                       on_tick: Callable[[], None] | None = None) -> None:
        """Start the thread that applies other replicas' events: ``on_event(op, key, version)``;
        ``on_connected()`` runs after each (re)subscription, before events are applied, and ``on_tick()``
        every ``reconcile_interval`` seconds while subscribed."""
        if self._listener is not None and self._listener.is_alive():
            return
        self._stop.clear()
        self._listener = threading.Thread(target=self._listen, args=(on_event, on_connected, on_tick),
                                          name="prefix-store-redis-events", daemon=True)
        self._listener.start()

    def stop_listener(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout)
            self._listener = None
        self._subscribed.clear()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the listener is subscribed (and has reconciled); for start-up checks and tests."""
        return self._subscribed.wait(timeout)

    def _listen(self, on_event, on_connected, on_tick) -> None:
        backoff = 0.05
        failing = False
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._events_client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._mark_up()
                # Subscribed first, then reconciled: an event published meanwhile is not lost.
                self._recovered.clear()
                self._reconcile(on_connected)
                self.connects += 1
                self._subscribed.set()
                next_tick = time.monotonic() + self.reconcile_interval
                if failing:
                    log.info("Redis events: resubscribed to %s on %s", self.channel, self.url)
                failing, backoff = False, 0.05
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.25)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"], on_event)
                    if self._down_logged and self.available:
                        # Requests found Redis down but this connection is intact (e.g. Redis hung, then
                        # resumed): probe it, so that recovery does not wait for the next request.
                        try:
                            self._call("ping", self.client.ping)
                        except RedisUnavailable:
                            pass
                    if self._recovered.is_set():  # writes made meanwhile are only on local disks
                        self._recovered.clear()
                        self._reconcile(on_connected)
                    if on_tick is not None and time.monotonic() >= next_tick and self.available:
                        # Redis may have lost data without dropping this connection (FLUSHALL, eviction)
                        self._reconcile(on_tick)
                        self.reconciles += 1
                        next_tick = time.monotonic() + self.reconcile_interval
            except Exception as exc:  # noqa: BLE001 - the listener must survive anything and retry
                # The breaker is left to the request path: a dropped subscription alone (Redis fine) must not
                # stop the version checks that cover the events missed until the listener is back.
                self._subscribed.clear()
                if not failing:
                    log.warning("Redis events: listener lost its subscription (%s: %s); resubscribing with "
                                "backoff", type(exc).__name__, exc)
                failing = True
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001, S110 - closing a broken connection
                        pass
        self._subscribed.clear()

    @staticmethod
    def _reconcile(on_connected) -> None:
        try:
            on_connected()
        except RedisUnavailable:
            raise  # resubscribe (and reconcile) once Redis answers
        except Exception:  # a bug there must not keep the listener from its events
            log.exception("Redis events: reconciling with Redis failed")

    def _dispatch(self, data: bytes, on_event) -> None:
        try:
            event = json.loads(data)
            op, key, version, origin = event["op"], str(event["task"]), int(event["version"]), event["origin"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("Redis events: ignoring malformed message %r (%s)", data[:200], exc)
            return
        if origin == self.origin:
            return
        try:
            on_event(op, key, version)
        except Exception:  # one bad event must not stop the listener
            log.exception("Redis events: applying %s %s v%s failed", op, key, version)
        self.events += 1

    def close(self) -> None:
        self.stop_listener()
        for client in (self.client, self._events_client):
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - already closed or broken: nothing left to release
                pass
