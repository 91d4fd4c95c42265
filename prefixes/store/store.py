"""The prefix store: the tiers, fastest first, behind get/info/list/put/delete.

``memory`` and ``host`` (:mod:`prefixes.store.memory`), ``redis`` (:mod:`prefixes.store.shared`, optional)
and ``disk`` (:mod:`prefixes.store.disk`); ``tier_stats()`` reports each present tier, and metrics export
them with a ``tier`` label. Which version to serve is :func:`prefixes.store.resolve.resolve`'s decision;
this module only asks each tier for its part of it, in order.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from prefixes.keys import split_key
from prefixes.records import ResidentPrefix, TaskRecord, same_version
from prefixes.store.disk import DiskTier
from prefixes.store.errors import Quota, TaskNotFound, disk_faults
from prefixes.store.memory import LRU, CacheStats, HostLRU, NoCache, Residency
from prefixes.store.redis_layout import DEFAULT_KEY_PREFIX, RemoteState
from prefixes.store.redis_tier import RedisTier, RedisUnavailable
from prefixes.store.resolve import resolve
from prefixes.store.shared import NoSharedTier, RedisSharedTier
from prefixes.store.sync import Sync

log = logging.getLogger(__name__)


class PrefixStore:
    def __init__(self, root: Path, cache_bytes: int, prepare: Callable[[torch.Tensor], torch.Tensor], *,
                 host_cache_bytes: int = 0, redis_url: str | None = None,
                 redis_key_prefix: str = DEFAULT_KEY_PREFIX, reconcile_interval: float = 5.0):
        """``prepare`` moves a loaded tensor to the serving device and dtype (called once per load).

        ``host_cache_bytes`` > 0 adds the host-memory tier (pointless when the device is the CPU: pass 0).
        ``redis_url`` adds the shared Redis tier; without it the store is this disk and memory alone.
        ``reconcile_interval``: seconds between checks that Redis still holds what this disk does (what it
        lost is pushed back: :mod:`prefixes.store.sync`)."""
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self.prepare = prepare
        # Guards the memory tiers, every tier's stats, the pending markers and local version allocation.
        self.lock = threading.Lock()
        host = HostLRU("host", host_cache_bytes) if host_cache_bytes > 0 else NoCache("host")
        self.residency = Residency(LRU("memory", cache_bytes), host)
        self.disk = DiskTier(self.root, self.lock, self.residency)
        self._namespace_locks: dict[str | None, threading.Lock] = {}
        self.shared: NoSharedTier | RedisSharedTier = NoSharedTier()
        self.redis: RedisTier | None = None  # the connection, for start-up checks and tests
        self.sync: Sync | None = None
        if redis_url is not None:
            self.redis = RedisTier(redis_url, key_prefix=redis_key_prefix,
                                   reconcile_interval=reconcile_interval)
            shared = RedisSharedTier(self.redis, self.disk, self.lock)
            self.shared = shared
            self.sync = Sync(shared, self.disk, self.residency, self.lock)
            self.sync.start()
            pending = f", {len(shared.markers)} writes to push" if shared.markers else ""
            log.info("prefix store: shared Redis tier at %s (keys %s:*), local disk at %s%s", self.redis.url,
                     redis_key_prefix, self.root, pending)

    @property
    def stats(self) -> CacheStats:
        """Device memory's counters (the ``memory`` tier)."""
        return self.residency.device.stats

    @property
    def host_stats(self) -> CacheStats:
        return self.residency.host.stats

    @property
    def disk_stats(self) -> CacheStats:
        return self.disk.stats

    def close(self) -> None:
        """Stop the Redis listener and close its connections (the store keeps working on disk alone)."""
        self.shared.close()

    def tier_stats(self) -> dict[str, CacheStats]:
        """Counters per present tier, fastest first, for metrics."""
        tiers: dict[str, CacheStats] = {}
        for tier in (self.residency.device, self.residency.host, self.shared, self.disk):
            tier.report(tiers)
        return tiers

    # -- reads --------------------------------------------------------------------------------------------

    def get(self, key: str) -> ResidentPrefix:
        """The task's current version: from device memory when resident and current, else loaded from the
        nearest tier that has it (host memory, local disk, Redis)."""
        self.disk.path(key)
        remote, reachable = self.shared.probe(key)
        pending = self.shared.pending(key)

        def current(record: TaskRecord) -> bool:  # superseded or deleted on another replica: not current
            return same_version(resolve(remote, reachable, pending, record), record)

        with self.lock:
            generation = self.residency.generation(key)
            resident = self.residency.device.lookup(key, current)
        if resident is not None:
            return resident
        start = time.perf_counter()
        record, kind, tensor = self._load(key, remote, reachable)
        resident = ResidentPrefix(record, kind, self.prepare(tensor))
        with self.lock:
            self.residency.device.loaded(time.perf_counter() - start)
            if self.residency.admissible(key, generation, record):
                self.residency.device.admit(key, resident)
        return resident

    def _load(self, key: str, remote: RemoteState | None,
              reachable: bool) -> tuple[TaskRecord, PrefixKind, torch.Tensor]:
        """The current version's record, kind and CPU tensor, from the nearest tier that holds that exact
        version: host memory, the local disk, then Redis (which says which version is current)."""
        local = self.disk.record(key)
        pending = self.shared.pending(key)
        want = resolve(remote, reachable, pending, local)
        if want is None:
            if reachable and local is not None and remote is not None and remote.deleted \
                    and remote.version >= local.version and pending is None:
                try:
                    self.disk.delete(key, remote.version)  # deleted on another replica: the local copy goes
                except OSError as exc:  # (a read-only disk): not served anyway, Redis says it is deleted
                    log.warning("could not remove deleted task %s from the local disk (%s)", key, exc)
            self.disk.miss()
            raise self.shared.not_found(key, reachable)
        with self.lock:
            kept = self.residency.host.lookup(key, lambda record: same_version(record, want))
        if kept is not None:
            return kept.record, kept.kind, kept.tensor
        if not reachable:
            self.shared.unreachable()  # could not even tell which version is current
        loaded = None
        if not same_version(want, local):  # the local disk lacks the current version
            try:
                fetched = self.shared.fetch(key)
            except RedisUnavailable:
                fetched = None
                self.shared.unreachable()
            if fetched is not None:
                self.disk.miss()
                loaded = fetched[0], fetched[2]
        if loaded is None:  # the local disk holds the current version (or Redis could not help: serve ours)
            loaded = self.disk.load(key)
        record, artifact = loaded
        kept = self.residency.host.keepable(ResidentPrefix(record, artifact.kind, artifact.tensor))
        with self.lock:
            self.residency.host.admit(key, kept)
        return record, artifact.kind, artifact.tensor

    def info(self, key: str) -> TaskRecord:
        self.disk.path(key)
        remote, reachable = self.shared.probe(key)
        record = resolve(remote, reachable, self.shared.pending(key), self.disk.record(key))
        if record is None:
            raise self.shared.not_found(key, reachable)
        return record

    def list(self, namespace: str | None = None) -> list[TaskRecord]:
        """Every task, or only those whose key is in ``namespace``."""
        local = set(self.disk.keys(namespace))
        states, reachable = self.shared.probe_namespace(namespace, sorted(local))
        records = []
        for key in sorted(states):
            record = resolve(states[key], reachable, self.shared.pending(key),
                             self.disk.record(key) if key in local else None)
            if record is not None:
                records.append(record)
        return records

    def read_artifact(self, key: str) -> bytes:
        """The current version's file, in prefix-serve's format."""
        self.disk.path(key)
        remote, reachable = self.shared.probe(key)
        local = self.disk.record(key)
        want = resolve(remote, reachable, self.shared.pending(key), local)
        if want is None:
            raise self.shared.not_found(key, reachable)
        if not same_version(want, local):
            try:
                fetched = self.shared.fetch(key)
            except RedisUnavailable:
                fetched = None
            if fetched is not None:
                return fetched[1]
        return self.disk.read(key)[1]

    # -- writes -------------------------------------------------------------------------------------------

    def put(self, key: str, artifact: PrefixArtifact, quota: Quota | None = None) -> TaskRecord:
        """Store ``artifact`` as the next version of ``key``.

        Under ``quota`` the namespace's live tasks (but ``key``'s current version) and the new one must fit,
        or QuotaExceeded. The check and the write are one step: under the namespace's lock here, and in the
        script that publishes to Redis across replicas."""
        self.disk.path(key)
        data, sha256 = to_own_format(artifact), artifact.sha256()

        def make_record(version: int) -> TaskRecord:
            return TaskRecord.describe(key, artifact, version, sha256)

        if quota is None or not quota.limits:
            return self._write(key, data, make_record, None)
        namespace = split_key(key)[0]
        with self._namespace_lock(namespace):
            others = [r for r in self.list(namespace) if r.key != key]
            quota.check(namespace, len(others), sum(r.bytes for r in others), artifact.nbytes)
            return self._write(key, data, make_record, quota)

    def _namespace_lock(self, namespace: str | None) -> threading.Lock:
        with self.lock:
            return self._namespace_locks.setdefault(namespace, threading.Lock())

    def _write(self, key: str, data: bytes, make_record: Callable[[int], TaskRecord],
               quota: Quota | None) -> TaskRecord:
        """Stage the file, have Redis number and publish it (or the disk, without Redis), make it current
        here. A full or read-only disk fails while staging, before Redis hears of the version."""
        storing = f"storing task {split_key(key)[1]!r}"
        with disk_faults(storing):
            stage = self.disk.stage(data)
        try:
            with disk_faults(storing):
                published = self.shared.publish(key, data, make_record, quota, floor=self.disk.floor(key),
                                                prepare=lambda record: self.disk.prepare(stage, record))
        except BaseException:
            self.disk.discard(stage)
            raise
        if published is None:  # numbered by the local disk (no Redis, or Redis unreachable)
            with disk_faults(storing):
                record = self.disk.commit(key, stage, make_record)
            assert record is not None, "a locally numbered version is always written"
            return record
        try:  # None from commit: a concurrent put here got a later version onto the disk first
            self.disk.commit(key, stage, lambda _version: published, version=published.version)
        except OSError as exc:  # staged and prepared, so not for want of space: the version is in Redis
            log.error("task %s v%d is current in Redis but could not be made current on this disk (%s); "
                      "it is served from Redis", key, published.version, exc)
        return published

    def delete(self, key: str) -> None:
        self.disk.path(key)
        remote, reachable = self.shared.probe(key)
        local = self.disk.record(key)
        if resolve(remote, reachable, self.shared.pending(key), local) is None:
            raise self.shared.not_found(key, reachable)
        floor = max(local.version if local else 0, remote.version if remote else 0)
        deleting = f"deleting task {split_key(key)[1]!r}"
        with disk_faults(deleting):
            try:  # first: the name's high-water mark, and a read-only disk refuses before Redis changes
                self.disk.remember_delete(key, floor)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise  # a full disk must still take deletes (disk.delete remembers it afterwards)
        tombstone = self.shared.delete(key, floor, reachable)
        with disk_faults(deleting):
            removed = self.disk.delete(key, tombstone or floor)
        if not removed and not isinstance(self.shared, RedisSharedTier):
            raise TaskNotFound(key)  # a concurrent delete here got there first
