"""The shared Redis tier of the prefix store: one Redis, many serving replicas.

Layout (``P`` is the key prefix, ``prefix-serve`` by default; ``K`` a store key such as ``acme~summary``)::

    P:task:K   hash   live:      version, sha256, owner, at (created_at), bytes, meta (TaskRecord JSON),
                                 data (the prefix-serve safetensors file: to_own_format)
                      tombstone: version, deleted=1, at (deletion time)
    P:seq:K    string the last version number handed out for K (versions are allocated here, atomically)
    P:tasks    set    keys of live tasks (what ``list`` shows)
    P:bytes    string bytes of live tasks (the tier's resident bytes)
    P:events   pub/sub channel: {"op": "put"|"delete", "task": K, "version": N, "origin": replica id}

Every write is one Lua script, so Redis applies it atomically: a version is only ever written over an
older one (compare-and-set on ``version``), the set, the byte count and the event change with it, and a
version number is never reused (the sequence is bumped past every version written, including ones pushed
back by a replica after Redis lost its data). A delete leaves a tombstone with a version above every
earlier one, so a replica's old local copy can never look newer than the delete.

Nothing here is unpickled: values are JSON, integers and safetensors bytes.

Failure handling: every call has short socket timeouts and one immediate retry on a fresh connection
(a pooled connection may be stale after a Redis restart). A call that still fails raises
:class:`RedisUnavailable` and opens a breaker (``retry_after`` seconds, doubling up to ``max_retry_after``
while Redis stays down) during which calls fail fast, so a dead Redis costs a request nothing (the store
then serves from memory and local disk); the first call after it, or the listener's resubscription,
closes it again. The listener thread
(pub/sub) reconnects by itself with exponential backoff and tells the store each time it is subscribed
again, which is when the store reconciles its local disk with Redis (see ``PrefixStore._resync``).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "prefix-serve"
FIELDS = ("version", "sha256", "deleted", "at", "meta")


class RedisUnavailable(RuntimeError):
    """Redis could not be reached (or answered with an error); the caller falls back to local tiers."""


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What Redis holds for one key: a live version (with its record) or a tombstone."""

    version: int
    deleted: bool
    at: float  # created_at of a live version, deletion time of a tombstone
    sha256: str | None = None
    meta: dict | None = None  # the TaskRecord fields of a live version


# KEYS: seq, task hash.  ARGV: floor.  A version above the sequence, the stored version and ``floor``.
_ALLOCATE = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local stored = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
local n = math.max(seq, stored, tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], n)
return n
"""

# KEYS: task hash, seq, tasks set, bytes counter.
# ARGV: key, version, sha256, owner, meta, data, at, bytes, channel, origin.
# Writes the version only over an older one; returns 1 when written, 0 when Redis already has it or newer.
_PUBLISH = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local v = tonumber(ARGV[2])
if stored >= v then return 0 end
local old = 0
if stored > 0 and not redis.call('HGET', KEYS[1], 'deleted') then
  old = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', v, 'sha256', ARGV[3], 'owner', ARGV[4], 'meta', ARGV[5],
           'data', ARGV[6], 'at', ARGV[7], 'bytes', ARGV[8])
if tonumber(redis.call('GET', KEYS[2]) or '0') < v then redis.call('SET', KEYS[2], v) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('INCRBY', KEYS[4], tonumber(ARGV[8]) - old)
redis.call('PUBLISH', ARGV[9], cjson.encode({op='put', task=ARGV[1], version=v, origin=ARGV[10]}))
return 1
"""

# KEYS: task hash, seq, tasks set, bytes counter.  ARGV: key, floor, force, at, channel, origin.
# Replaces the task by a tombstone with a fresh version; returns it, or -1 when there was no live task and
# not ``force`` (the caller's local copy is what is being deleted).
_DELETE = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local live = stored > 0 and not redis.call('HGET', KEYS[1], 'deleted')
if not live and ARGV[3] == '0' then return -1 end
local old = 0
if live then old = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') end
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = math.max(seq, stored, tonumber(ARGV[2])) + 1
redis.call('SET', KEYS[2], n)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', n, 'deleted', '1', 'at', ARGV[4])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[4], old)
redis.call('PUBLISH', ARGV[5], cjson.encode({op='delete', task=ARGV[1], version=n, origin=ARGV[6]}))
return n
"""


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _state(values: list[bytes | None]) -> RemoteState | None:
    """A RemoteState from ``HMGET FIELDS`` (plus anything after), None when the key does not exist."""
    version, sha256, deleted, at, meta = values[:5]
    if version is None:
        return None
    try:
        state = RemoteState(version=int(version), deleted=deleted is not None, at=float(at or 0.0),
                            sha256=_text(sha256), meta=None if meta is None else json.loads(meta))
        if not state.deleted and not isinstance(state.meta, dict):
            raise ValueError("a live entry without its record")
    except ValueError as exc:  # not written by this code: ignored, as if Redis did not have it
        log.error("ignoring a malformed Redis entry (version %r): %s", version, exc)
        return None
    return state


class RedisTier:
    def __init__(self, url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX, socket_timeout: float = 0.25,
                 retry_after: float = 0.5, max_retry_after: float = 5.0, max_backoff: float = 2.0):
        self.url = redact(url)  # for messages; the client gets the real one
        self.key_prefix = key_prefix
        self.channel = f"{key_prefix}:events"
        self.origin = uuid.uuid4().hex  # this replica: it ignores its own events
        self.retry_after = retry_after  # the breaker's first pause; it doubles while Redis stays down
        self.max_retry_after = max_retry_after
        self.max_backoff = max_backoff  # the listener's longest wait between reconnection attempts
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
        self._allocate = self.client.register_script(_ALLOCATE)
        self._publish = self.client.register_script(_PUBLISH)
        self._delete = self.client.register_script(_DELETE)
        self._down_until = 0.0
        self._down_pause = retry_after
        self._down_logged = False
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._recovered = threading.Event()  # Redis answered again after failing: reconcile (listener)
        self.connects = 0  # successful (re)subscriptions of the listener
        self.events = 0  # events from other replicas handled

    # -- keys -----------------------------------------------------------------------------------------------

    def _task(self, key: str) -> str:
        return f"{self.key_prefix}:task:{key}"

    def _seq(self, key: str) -> str:
        return f"{self.key_prefix}:seq:{key}"

    @property
    def _tasks(self) -> str:
        return f"{self.key_prefix}:tasks"

    @property
    def _bytes(self) -> str:
        return f"{self.key_prefix}:bytes"

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
        return self._call("probe", lambda: _state(self.client.hmget(self._task(key), FIELDS)))

    def probe_many(self, keys: Iterable[str]) -> dict[str, RemoteState | None]:
        keys = list(keys)

        def run():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._task(key), FIELDS)
            return {key: _state(values) for key, values in zip(keys, pipe.execute())}

        return self._call("probe", run) if keys else {}

    def fetch(self, key: str) -> tuple[RemoteState, bytes] | None:
        """The live version's state and its safetensors bytes, read together; None when not live."""
        values = self._call("fetch", lambda: self.client.hmget(self._task(key), (*FIELDS, "data")))
        state = _state(values)
        if state is None or state.deleted or values[-1] is None:
            return None
        return state, values[-1]

    def keys(self) -> set[str]:
        """Keys of every live task."""
        return {k.decode() for k in self._call("list", lambda: self.client.smembers(self._tasks))}

    def totals(self) -> tuple[int, int]:
        """(bytes, tasks) held live in Redis."""
        def run():
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self._bytes)
            pipe.scard(self._tasks)
            return pipe.execute()

        nbytes, count = self._call("stats", run)
        return int(nbytes or 0), int(count)

    # -- writes ---------------------------------------------------------------------------------------------

    def allocate(self, key: str, floor: int = 0) -> int:
        """A new version number for ``key``, unique across replicas and above ``floor``."""
        return int(self._call("allocate", lambda: self._allocate(keys=[self._seq(key), self._task(key)],
                                                                 args=[floor])))

    def publish(self, record: dict, data: bytes, owner: str | None) -> bool:
        """Make ``record`` (TaskRecord fields) with tensor file ``data`` current, unless Redis already has
        that version or a newer one. ``owner``: the task's namespace (None: single-user)."""
        key = record["task"]
        args = [key, record["version"], record["sha256"], owner or "", json.dumps(record), data,
                repr(float(record["created_at"])), record["bytes"], self.channel, self.origin]
        keys = [self._task(key), self._seq(key), self._tasks, self._bytes]
        return bool(self._call("publish", lambda: self._publish(keys=keys, args=args)))

    def delete(self, key: str, floor: int = 0, force: bool = False, at: float | None = None) -> int | None:
        """Tombstone ``key``; returns the tombstone's version, None when Redis had no live task (and not
        ``force``)."""
        keys = [self._task(key), self._seq(key), self._tasks, self._bytes]
        args = [key, floor, "1" if force else "0", repr(time.time() if at is None else at), self.channel,
                self.origin]
        version = int(self._call("delete", lambda: self._delete(keys=keys, args=args)))
        return None if version < 0 else version

    # -- pub/sub listener -----------------------------------------------------------------------------------

    def start_listener(self, on_event: Callable[[str, str, int], None],
                       on_connected: Callable[[], None]) -> None:
        """Start the thread that applies other replicas' events: ``on_event(op, key, version)``;
        ``on_connected()`` runs after each (re)subscription, before events are applied."""
        if self._listener is not None and self._listener.is_alive():
            return
        self._stop.clear()
        self._listener = threading.Thread(target=self._listen, args=(on_event, on_connected),
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

    def _listen(self, on_event, on_connected) -> None:
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
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
        self._subscribed.clear()

    @staticmethod
    def _reconcile(on_connected) -> None:
        try:
            on_connected()
        except RedisUnavailable:
            raise  # resubscribe (and reconcile) once Redis answers
        except Exception:  # noqa: BLE001 - a bug there must not keep the listener from its events
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
        except Exception:  # noqa: BLE001 - one bad event must not stop the listener
            log.exception("Redis events: applying %s %s v%s failed", op, key, version)
        self.events += 1

    def close(self) -> None:
        self.stop_listener()
        for client in (self.client, self._events_client):
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
