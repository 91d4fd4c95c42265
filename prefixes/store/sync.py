"""Keeping a replica's disk and memory in step with Redis: other replicas' events, and the reconciliation
after each (re)subscription of the listener and every ``reconcile_interval`` seconds.

Events only make invalidation immediate (every ``get`` checks Redis's version anyway). A task loaded from
Redis is written through to the local disk, and events refresh or remove local copies in the background.

When the listener is subscribed again (it reconnects by itself, with backoff) :meth:`Sync.resync` pushes
the writes made here while Redis was unreachable: an outage write wins unless Redis holds a later one (by
wall-clock time: last writer wins), and it gets a fresh version number. The same pass pushes local
versions Redis lacks (e.g. Redis restarted without persistence) and refreshes or removes local copies
Redis has superseded.

Redis can also lose data while the connection stays up (FLUSHALL, a failover to an empty server behind the
same address, eviction): the periodic pass (:meth:`Sync.reconcile`, the listener calls it every
``reconcile_interval`` seconds) pushes back every local version and every delete this disk remembers
(``deleted/``) that Redis lacks, each only over an older version, so the newest version wins and all
replicas list and serve the same tasks again within about one interval. A replica that missed a delete can
still push the task back if no replica that saw the delete is running: run Redis with persistence.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from prefixes.keys import STORE_KEY
from prefixes.records import TaskRecord, same_version
from prefixes.store.disk import DiskTier, Tombstone
from prefixes.store.memory import Residency
from prefixes.store.redis_layout import RemoteState
from prefixes.store.redis_tier import RedisRefused, RedisUnavailable
from prefixes.store.shared import RedisSharedTier

log = logging.getLogger(__name__)


class Sync:
    def __init__(self, shared: RedisSharedTier, disk: DiskTier, residency: Residency, lock: threading.Lock):
        self.shared = shared
        self.redis = shared.redis
        self.disk = disk
        self.residency = residency
        self.lock = lock

    def start(self) -> None:
        self.redis.start_listener(self.on_event, self.resync, self.reconcile)

    def on_event(self, op: str, key: str, version: int) -> None:
        """Another replica wrote ``version`` of ``key`` (listener thread)."""
        if not STORE_KEY.fullmatch(key):
            return
        with self.lock:
            self.residency.announce(op, key, version)
        if self.shared.pending(key) is not None:
            return  # an unpushed local write: resync decides
        local = self.disk.record(key)
        if local is None or local.version >= version:
            return
        if op == "delete":
            self.disk.delete(key, version)
        else:  # keep the local copy current, for the next outage
            try:
                self.shared.fetch(key, lookup=False)
            except RedisUnavailable:
                pass

    def resync(self) -> None:
        """Reconcile the local disk with Redis (listener thread, after each (re)subscription)."""
        added = self.redis.backfill_owned()
        if added:
            log.info("added %d tasks stored by an earlier release to the quota index", added)
        self.reconcile()

    def reconcile(self) -> None:
        """Push back what Redis lacks of this disk's tasks and deletes, follow Redis where it is newer
        (listener thread: after each (re)subscription, and every ``reconcile_interval`` seconds)."""
        deleted = self.disk.tombstones()
        keys = sorted(set(self.disk.keys()) | set(self.shared.markers) | set(deleted))
        states = self.redis.probe_many(keys)
        pushed, refused = 0, None
        for key in keys:
            try:
                pushed += self._reconcile(key, states[key], deleted.get(key))
            except RedisUnavailable:
                raise
            except RedisRefused as exc:  # out of memory, read-only: tried again next time
                refused = exc
            except Exception:  # one task must not stop the others
                log.exception("reconciling task %s with Redis failed", key)
        if pushed:
            log.warning("Redis lacked %d tasks or deletes this replica holds (a restart, failover, flush or "
                        "eviction): pushed them back", pushed)
        if refused is not None:
            log.warning("Redis refused pushing back tasks it lacks (%s); retrying in %.0f s", refused,
                        self.redis.reconcile_interval)

    def _reconcile(self, key: str, remote: RemoteState | None, deleted: Tombstone | None) -> bool:
        """Bring one key in step; True when something Redis lacked was pushed to it."""
        pending = self.shared.pending(key)
        if pending is not None:
            self._push_pending(key, remote)
            return False
        local = self.disk.record(key)
        if local is None:
            if deleted is not None and (remote is None or remote.version < deleted.version):
                return self.redis.tombstone(key, deleted.version, deleted.at)  # Redis lost the delete
            return False
        if remote is None or remote.version < local.version:  # Redis lost it, or never got it
            data = self.disk.read_version(key, local.version)
            if self.redis.publish(local.as_json(), data, local.namespace):
                return True
            remote = self.redis.probe(key)  # another replica got there first: follow Redis
            if remote is None:
                return False
        if remote.deleted:
            if remote.version >= local.version:
                self.disk.delete(key, remote.version)
        elif remote.meta is not None and not same_version(local, TaskRecord.from_json(remote.meta)):
            self.shared.fetch(key, lookup=False)
        return False

    def _push_pending(self, key: str, remote: RemoteState | None) -> None:
        """Push the put or delete made here while Redis was unreachable, unless a later write superseded
        it."""
        pending = self.shared.pending(key)
        assert pending is not None
        local = self.disk.record(key)
        if remote is not None and remote.at > pending.at:
            log.warning("the %s of task %s made here while Redis was unreachable was superseded by a "
                        "later write on another replica", pending.op, key)
            if local is not None:  # whatever its version number, the outage write lost: take Redis's
                self.disk.delete(key, remote.version, remember=remote.deleted)
            self.shared.clear_pending(key)
            if not remote.deleted:
                self.shared.fetch(key, lookup=False)
        elif pending.op == "put":
            if local is not None and local.sha256 == pending.sha256:
                # A fresh version above anything Redis has seen; created_at stays the upload's time.
                floor = max(local.version, remote.version if remote else 0)
                version = self.redis.allocate(key, floor=floor)
                record = dataclasses.replace(local, version=version)
                data = self.disk.read_version(key, local.version)
                written = self.disk.write(key, data, lambda _version: record, version=version)
                if written is not None:
                    self.redis.publish(record.as_json(), data, record.namespace)
                    log.info("pushed task %s (uploaded while Redis was unreachable) as v%d", key, version)
            self.shared.clear_pending(key)
        else:
            tombstone = remote.version if remote is not None and remote.deleted else 0
            if remote is None or not remote.deleted:
                # A tombstone even when Redis lost the task: older copies pushed back later lose to it.
                floor = max(remote.version if remote else 0, pending.version)
                tombstone = self.redis.delete(key, floor=floor, force=True, at=pending.at) or 0
                log.info("pushed the delete of task %s (made while Redis was unreachable)", key)
            self.disk.delete(key, tombstone, at=pending.at)
            self.shared.clear_pending(key)
