"""The shared tier as the store sees it: Redis decides which version of a task is current.

``redis``  optional (``redis_url``), shared by all replicas (layout: :mod:`prefixes.store.redis_layout`).
           Without it the store holds a :class:`NoSharedTier`: the local disk alone decides.

With Redis, every ``get`` asks Redis which version is current (one HMGET), and the bytes come from the
nearest tier holding exactly that version (same version and sha256): host memory, this replica's disk,
then Redis. A local file read is several times cheaper than moving the tensor over the network (6 MB:
~2.5 ms from disk vs ~13 ms from Redis on loopback), so Redis serves the bytes a replica does not have yet
(then written through to its disk) and the version everyone must serve.

- Versions are allocated by Redis (atomically across replicas). A put stages its file on the local disk
  (fsynced), publishes to Redis (a compare-and-set that never replaces a newer version, with the quota
  check in the same script) and a pub/sub event, then makes the staged version current locally.
- Every ``get`` compares the resident copy with Redis's version and digest, so a missed event can never
  serve a stale prefix; events only make invalidation immediate (:mod:`prefixes.store.sync`).
- Deletes leave a tombstone in Redis with a version above every earlier one: an old local copy can never
  resurrect a deleted task while Redis is up.
- Redis out of memory or read-only: uploads are refused (StorageFull, StoreReadOnly) before anything is
  written; Redis is reachable, so reads and deletes go on.
- Redis unreachable: resident tasks keep serving, cold ones load from the local disk, puts and deletes
  apply to the local disk and are recorded in ``pending/`` for :mod:`prefixes.store.sync` to push.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prefixes.artifact import PrefixArtifact
from prefixes.formats import InvalidArtifact, from_own_format
from prefixes.keys import STORE_KEY, in_namespace, split_key
from prefixes.records import TaskRecord, same_version
from prefixes.store.disk import DiskTier, MakeRecord, fsync_dir, fsync_write
from prefixes.store.errors import Quota, StorageFull, StoreReadOnly, StoreUnavailable, TaskNotFound
from prefixes.store.memory import CacheStats
from prefixes.store.redis_layout import RemoteState
from prefixes.store.redis_tier import (
    QuotaRefused,
    RedisOutOfMemory,
    RedisRefused,
    RedisTier,
    RedisUnavailable,
)
from prefixes.store.resolve import Pending

log = logging.getLogger(__name__)

States = dict[str, RemoteState | None]  # key -> Redis's state of it (None: Redis never heard of it)
Prepare = Callable[[TaskRecord], None]  # stages a numbered version locally before Redis makes it current


def refused_write(key: str, exc: RedisRefused, action: str = "storing") -> StorageFull | StoreReadOnly:
    """The domain error for Redis refusing a write (``action`` task ...)."""
    task = split_key(key)[1]
    if isinstance(exc, RedisOutOfMemory):
        return StorageFull(f"The shared store (Redis) is out of memory (its maxmemory): {action} task "
                           f"{task!r} was refused and nothing of it was kept; earlier tasks are intact. "
                           "Delete tasks, or have the operator raise Redis's maxmemory.")
    return StoreReadOnly(f"The shared store (Redis) is read-only (a replica, e.g. after a failover): "
                         f"{action} task {task!r} was refused; earlier tasks are intact and still served.")


class NoSharedTier:
    """No Redis: nothing beyond this replica exists, and the local disk numbers versions."""

    def probe(self, key: str) -> tuple[RemoteState | None, bool]:
        return None, True  # a certain answer: no other tier holds anything

    def probe_namespace(self, namespace: str | None, local: list[str]) -> tuple[States, bool]:
        return dict.fromkeys(local), True

    def pending(self, key: str) -> Pending | None:
        return None

    def not_found(self, key: str, reachable: bool) -> Exception:
        return TaskNotFound(key)

    def fetch(self, key: str, lookup: bool = True) -> tuple[TaskRecord, bytes, PrefixArtifact] | None:
        return None

    def publish(self, key: str, data: bytes, make_record: MakeRecord, quota: Quota | None,
                floor: int, prepare: Prepare) -> TaskRecord | None:
        return None  # the disk numbers the version

    def delete(self, key: str, floor: int, reachable: bool) -> int | None:
        return None  # only the disk held it

    def unreachable(self) -> None:
        pass

    def report(self, into: dict[str, CacheStats]) -> None:
        pass

    def close(self) -> None:
        pass


class RedisSharedTier:
    def __init__(self, redis: RedisTier, disk: DiskTier, lock: threading.Lock):
        self.redis = redis
        self.disk = disk
        self.lock = lock  # the store's: guards the stats and the pending markers below
        self.stats = CacheStats()
        self.pending_dir = disk.root / "pending"
        self.pending_dir.mkdir(exist_ok=True)
        self.markers: dict[str, Pending] = {}  # key -> write made while Redis was unreachable
        self._load_pending()

    # -- which version is current -----------------------------------------------------------------------

    def probe(self, key: str) -> tuple[RemoteState | None, bool]:
        """(Redis's state of the key, whether Redis answered)."""
        try:
            return self.redis.probe(key), True
        except RedisUnavailable:
            return None, False

    def probe_namespace(self, namespace: str | None, local: list[str]) -> tuple[States, bool]:
        """Redis's state of every key in ``namespace`` it or the local disk (``local``) holds."""
        try:
            remote = {k for k in self.redis.live_keys() if in_namespace(k, namespace)}
            return self.redis.probe_many(sorted(set(local) | remote)), True
        except RedisUnavailable:
            return dict.fromkeys(local), False

    def pending(self, key: str) -> Pending | None:
        return self.markers.get(key)

    def not_found(self, key: str, reachable: bool) -> Exception:
        """What a miss means: the task does not exist, or (Redis unreachable) nobody here can tell."""
        marker = self.markers.get(key)
        if reachable or (marker is not None and marker.op == "delete"):
            return TaskNotFound(key)  # (a delete made here during the outage is known)
        return StoreUnavailable(key, max(1, math.ceil(self.redis.retry_in)))

    # -- loads ------------------------------------------------------------------------------------------

    def fetch(self, key: str, lookup: bool = True) -> tuple[TaskRecord, bytes, PrefixArtifact] | None:
        """Load the live version from Redis, check its digest and write it through to the local disk.
        None when Redis has no live version (or a corrupt one); raises RedisUnavailable. ``lookup``: a
        request's load (counted in the tier's stats), not a background refresh."""
        start = time.perf_counter()
        fetched = self.redis.fetch(key)
        state, data = fetched if fetched is not None else (None, b"")
        if state is None or state.meta is None:
            self._count(miss=lookup)
            return None
        record = TaskRecord.from_json(state.meta)
        try:
            artifact = from_own_format(data, f"{key} v{record.version} (redis)")
            if artifact.sha256() != record.sha256:
                raise InvalidArtifact("its tensor does not match the sha256 of its record")
        except InvalidArtifact as exc:
            log.error("Redis copy of task %s v%s is unusable (%s): serving from the local disk", key,
                      record.version, exc)
            self._count(miss=lookup)
            return None
        if lookup:
            self._count(seconds=time.perf_counter() - start)
        self._install(record, data)
        return record, data, artifact

    def _install(self, record: TaskRecord, data: bytes) -> None:
        """Write a version loaded from Redis to the local disk, so it survives a Redis outage."""
        key = record.key
        local = self.disk.record(key)
        if local is not None and (local.version > record.version or same_version(local, record)):
            return
        deleted = self.disk.tombstone(key)
        if local is None and deleted is not None and deleted.version >= record.version:
            return  # an older version pushed back after Redis lost data: the delete here pushes it out
        try:
            if local is not None and local.version == record.version:  # same number, other tensor: Redis wins
                self.disk.delete(key, remember=False)
            self.disk.write(key, data, lambda _version: record, version=record.version, invalidate=False)
            self.clear_pending(key)  # Redis's later write won over an unpushed one
        except OSError as exc:
            log.warning("could not write task %s v%s to the local disk (%s); it is still served",
                        key, record.version, exc)

    def unreachable(self) -> None:
        """A request's load that Redis could not help (unreachable)."""
        self._count(miss=True)

    def _count(self, miss: bool = False, seconds: float | None = None) -> None:
        with self.lock:
            if miss:
                self.stats.misses += 1
            if seconds is not None:
                self.stats.hits += 1
                self.stats.load_seconds_total += seconds

    # -- writes -----------------------------------------------------------------------------------------

    def publish(self, key: str, data: bytes, make_record: MakeRecord, quota: Quota | None,
                floor: int, prepare: Prepare) -> TaskRecord | None:
        """Allocate a version, ``prepare`` it on the local disk, then make it current in Redis (under
        ``quota``, atomically); the record to write locally with that version. None: Redis is unreachable,
        the disk numbers the version and the write is recorded as pending (first, so a crash cannot lose
        the push). Redis out of memory or read-only: StorageFull or StoreReadOnly, nothing changed."""
        try:
            version = self.redis.allocate(key, floor=floor)
        except RedisUnavailable:
            self.set_pending(key, Pending("put", time.time(), sha256=make_record(0).sha256))
            return None
        except RedisRefused as exc:
            raise refused_write(key, exc) from exc
        record = make_record(version)
        prepare(record)  # a full local disk fails here, before any replica can see the version
        try:
            self.redis.publish(record.as_json(), data, record.namespace,
                               quota if quota is not None and quota.limits else None)
        except RedisRefused as exc:  # (the allocation above passed, so this is a race with the limit)
            raise refused_write(key, exc) from exc
        except QuotaRefused as refused:
            assert quota is not None
            quota.check(record.namespace, refused.other_tasks, refused.other_bytes, record.bytes)
            raise AssertionError(f"Redis refused {key} under {quota} with {refused}") from None
        except RedisUnavailable:
            self.set_pending(key, Pending("put", record.created_at, sha256=record.sha256))
            return record
        self.clear_pending(key)  # this write supersedes an older unpushed one
        return record

    def delete(self, key: str, floor: int, reachable: bool) -> int | None:
        """Tombstone the key in Redis (its version), or record the delete as pending while Redis is
        unreachable (None)."""
        try:
            if not reachable:
                raise RedisUnavailable("unreachable")
            version = self.redis.delete(key, floor=floor, force=True)
            self.clear_pending(key)
            return version
        except RedisUnavailable:  # outage: tombstone Redis once it is back (sync)
            self.set_pending(key, Pending("delete", time.time(), version=floor))
        except RedisRefused as exc:
            raise refused_write(key, exc, "deleting") from exc
        return None

    # -- pending markers ----------------------------------------------------------------------------------

    def _load_pending(self) -> None:
        for path in self.pending_dir.iterdir():
            key = path.name.removesuffix(".json")
            try:
                if not STORE_KEY.fullmatch(key):
                    raise ValueError("not a store key")
                self.markers[key] = Pending.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError, OSError) as exc:  # a torn temporary file, or not ours
                log.warning("ignoring %s (%s)", path, exc)
                path.unlink(missing_ok=True)

    def set_pending(self, key: str, marker: Pending) -> None:
        tmp = self.pending_dir / f".{uuid.uuid4().hex}.tmp"
        fsync_write(tmp, json.dumps(marker.as_json()).encode())
        os.replace(tmp, self._marker_path(key))
        fsync_dir(self.pending_dir)
        self.markers[key] = marker

    def clear_pending(self, key: str) -> None:
        if self.markers.pop(key, None) is not None:
            self._marker_path(key).unlink(missing_ok=True)

    def _marker_path(self, key: str) -> Path:
        return self.pending_dir / f"{key}.json"

    def report(self, into: dict[str, CacheStats]) -> None:
        try:
            self.stats.resident_bytes, self.stats.resident_tasks = self.redis.totals()
        except RedisUnavailable:
            pass  # the last known figures
        into["redis"] = self.stats

    def close(self) -> None:
        self.redis.close()
