"""The task store: tiers from the serving device down to the durable disk, optionally shared through Redis.

Tiers, fastest first (``tier_stats()`` reports each; metrics export them with a ``tier`` label):

``memory``  device memory: a byte-budgeted LRU (``cache_bytes``) of tensors already on the serving device
            and dtype (``prepare``).
``host``    host memory, only when serving on an accelerator (``host_cache_bytes`` > 0): a byte-budgeted LRU
            of CPU tensors, so a task evicted from device memory comes back without touching Redis or disk.
``redis``   optional (``redis_url``), shared by all replicas: see :mod:`prefixes.redis_tier`.
``disk``    ``root``: each replica's durable copy, always written.

With Redis, Redis decides which version of a task is current (every ``get`` asks it, one HMGET), and the
bytes come from the nearest tier holding exactly that version (same version and sha256): host memory, this
replica's disk, then Redis. A local file read is several times cheaper than moving the tensor over the
network (6 MB: ~2.5 ms from disk vs ~13 ms from Redis on loopback), so Redis serves the bytes a replica
does not have yet (then written through to its disk) and the version everyone must serve.

Disk layout under ``root``::

    tasks/<task>/v<version>/prefix.safetensors   canonical tensors (prefix-serve format)
    tasks/<task>/v<version>/meta.json            the TaskRecord
    tasks/<task>/CURRENT                         the served version number
    tmp/  trash/                                 staging for atomic writes and deletes
    pending/<task>.json                          (Redis only) a write made while Redis was unreachable

A version directory is fully written and fsynced in ``tmp/`` before one ``rename`` puts it in place, and
``CURRENT`` changes by ``os.replace``. A crash at any point leaves either the old version or the new one
served, never a half-written file.

With Redis, Redis is the authority (see ``_resolve``):

- Versions are allocated by Redis (atomically across replicas). A put writes the local disk first (durable),
  then publishes to Redis (a compare-and-set that never replaces a newer version) and a pub/sub event.
- Every ``get`` compares the resident copy with Redis's version and digest (one HMGET), so a missed event
  can never serve a stale prefix; events only make invalidation immediate. A task loaded from Redis is
  written through to the local disk, and events refresh or remove local copies in the background.
- Deletes leave a tombstone in Redis with a version above every earlier one: an old local copy can never
  resurrect a deleted task while Redis is up.
- Redis unreachable: resident tasks keep serving, cold ones load from the local disk, puts and deletes
  apply to the local disk and are recorded in ``pending/``. When the listener is subscribed again (it
  reconnects by itself, with backoff) ``_resync`` pushes them: an outage write wins unless Redis holds a
  later one (by wall-clock time: last writer wins), and it gets a fresh version number. The same pass
  pushes local versions Redis lacks (e.g. Redis restarted without persistence) and refreshes or removes
  local copies Redis has superseded. Tombstones only live in Redis: run it with persistence, or a replica
  that missed a delete may push the task back after Redis lost its data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import InvalidArtifact, from_own_format, to_own_format
from prefixes.redis_tier import DEFAULT_KEY_PREFIX, RedisTier, RedisUnavailable, RemoteState

log = logging.getLogger(__name__)

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Store keys are a task name, optionally qualified by its owner's namespace: "acme~summary". Namespaces
# follow the task-name rules; a leading "_" marks namespaces the server reserves (e.g. "_shared").
NAMESPACE_SEP = "~"
STORE_KEY = re.compile(r"(?:_?[A-Za-z0-9][A-Za-z0-9._-]{0,63}~)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TENSOR_FILE = "prefix.safetensors"
META_FILE = "meta.json"
CURRENT_FILE = "CURRENT"


class TaskNotFound(KeyError):
    pass


class InvalidTaskName(ValueError):
    pass


class StoreUnavailable(RuntimeError):
    """Redis, which decides which tasks exist, cannot be reached and this replica holds no copy of the task:
    whether it exists is unknown until Redis is back (in about ``retry_after`` seconds)."""

    def __init__(self, task: str, retry_after: int):
        super().__init__(f"Task {split_key(task)[1]!r} is not on this replica and the shared store (Redis) is "
                         f"unreachable; retry in {retry_after} s.")
        self.task = task
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task: str
    kind: str
    num_virtual_tokens: int
    sha256: str
    version: int
    bytes: int
    source_format: str
    created_at: float

    @classmethod
    def describe(cls, task: str, artifact: PrefixArtifact, version: int, sha256: str | None = None) -> TaskRecord:
        return cls(task=task, kind=artifact.kind.value, num_virtual_tokens=artifact.num_virtual_tokens,
                   sha256=artifact.sha256() if sha256 is None else sha256, version=version,
                   bytes=artifact.nbytes, source_format=artifact.source_format, created_at=time.time())

    def as_json(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        """The task's name as its owner sees it (the key without the namespace)."""
        return split_key(self.task)[1]

    @property
    def namespace(self) -> str | None:
        return split_key(self.task)[0]


@dataclass(frozen=True, slots=True)
class ResidentPrefix:
    """A task ready for the engine: its record and its tensor already on the serving device and dtype."""

    record: TaskRecord
    kind: PrefixKind
    tensor: torch.Tensor

    @property
    def num_virtual_tokens(self) -> int:
        return self.record.num_virtual_tokens

    @classmethod
    def unstored(cls, task: str, artifact: PrefixArtifact) -> ResidentPrefix:
        """A servable task that never went through a store (training evaluation, benchmarks, tests):
        version 0, its tensor as it is (move it to the serving device and dtype first)."""
        return cls(TaskRecord.describe(task, artifact, version=0), artifact.kind, artifact.tensor)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    resident_tasks: int = 0
    load_seconds_total: float = 0.0


def check_task_name(task: str) -> str:
    if not TASK_NAME.fullmatch(task):
        raise InvalidTaskName(
            f"Task name {task!r} is invalid: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit."
        )
    return task


def task_key(name: str, namespace: str | None = None) -> str:
    """The store key of task ``name`` owned by ``namespace`` (None: the unqualified single-user key)."""
    check_task_name(name)
    return name if namespace is None else f"{namespace}{NAMESPACE_SEP}{name}"


def split_key(key: str) -> tuple[str | None, str]:
    namespace, sep, name = key.rpartition(NAMESPACE_SEP)
    return (namespace if sep else None), name


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _LRU:
    """A byte-budgeted LRU of ``key -> (record, kind, tensor)`` that keeps its tier's CacheStats current."""

    def __init__(self, budget: int, stats: CacheStats):
        self.budget = budget
        self.stats = stats
        self.items: OrderedDict[str, ResidentPrefix] = OrderedDict()

    def get(self, key: str) -> ResidentPrefix | None:
        item = self.items.get(key)
        if item is not None:
            self.items.move_to_end(key)
        return item

    def admit(self, key: str, item: ResidentPrefix) -> None:
        self.drop(key)
        size = _nbytes(item.tensor)
        if size > self.budget:
            return  # served to this request, but too large to keep
        while self.items and self.stats.resident_bytes + size > self.budget:
            _, evicted = self.items.popitem(last=False)
            self.stats.resident_bytes -= _nbytes(evicted.tensor)
            self.stats.evictions += 1
        self.items[key] = item
        self.stats.resident_bytes += size
        self.stats.resident_tasks = len(self.items)

    def drop(self, key: str) -> None:
        dropped = self.items.pop(key, None)
        if dropped is not None:
            self.stats.resident_bytes -= _nbytes(dropped.tensor)
        self.stats.resident_tasks = len(self.items)


def _same(a: TaskRecord | None, b: TaskRecord | None) -> bool:
    return a is not None and b is not None and a.version == b.version and a.sha256 == b.sha256


class PrefixStore:
    def __init__(self, root: Path, cache_bytes: int, prepare: Callable[[torch.Tensor], torch.Tensor], *,
                 host_cache_bytes: int = 0, redis_url: str | None = None,
                 redis_key_prefix: str = DEFAULT_KEY_PREFIX):
        """``prepare`` moves a loaded tensor to the serving device and dtype (called once per load).

        ``host_cache_bytes`` > 0 adds the host-memory tier (pointless when the device is the CPU: pass 0).
        ``redis_url`` adds the shared Redis tier; without it the store is this disk and memory alone."""
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self.host_cache_bytes = host_cache_bytes
        self.prepare = prepare
        self.stats = CacheStats()  # device memory ("memory" tier)
        self.host_stats = CacheStats()
        self.redis_stats = CacheStats()
        self.disk_stats = CacheStats()
        self._device = _LRU(cache_bytes, self.stats)  # key -> ResidentPrefix on the serving device
        self._host = _LRU(host_cache_bytes, self.host_stats)  # key -> ResidentPrefix with a CPU tensor
        self._generation: dict[str, int] = {}  # bumped by every invalidation: late loads are not admitted
        # the newest version another replica announced: a load of an older one finishing late is not admitted,
        # while a late event for the version just loaded (the usual race at start-up) leaves it resident
        self._announced: dict[str, int] = {}
        self._disk_bytes: dict[str, int] = {}  # key -> bytes of its current version on disk
        self._pending: dict[str, dict] = {}  # key -> write made while Redis was unreachable
        self._lock = threading.Lock()  # guards the LRUs, stats, the dicts above and local version allocation
        for sub in ("tasks", "tmp", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_staging()
        self.redis: RedisTier | None = None
        if redis_url is not None:
            (self.root / "pending").mkdir(exist_ok=True)
            self._load_pending()
            self.redis = RedisTier(redis_url, key_prefix=redis_key_prefix)
            self.redis.start_listener(self._on_event, self._resync)
            pending = f", {len(self._pending)} writes to push" if self._pending else ""
            log.info("prefix store: shared Redis tier at %s (keys %s:*), local disk at %s%s", self.redis.url,
                     redis_key_prefix, self.root, pending)

    def close(self) -> None:
        """Stop the Redis listener and close its connections (the store keeps working on disk alone)."""
        if self.redis is not None:
            self.redis.close()

    def tier_stats(self) -> dict[str, CacheStats]:
        """Counters per tier, for metrics."""
        tiers = {"memory": self.stats}
        if self.host_cache_bytes > 0:
            tiers["host"] = self.host_stats
        if self.redis is not None:
            try:
                self.redis_stats.resident_bytes, self.redis_stats.resident_tasks = self.redis.totals()
            except RedisUnavailable:
                pass  # the last known figures
            tiers["redis"] = self.redis_stats
        with self._lock:
            self.disk_stats.resident_bytes = sum(self._disk_bytes.values())
            self.disk_stats.resident_tasks = len(self._disk_bytes)
        tiers["disk"] = self.disk_stats
        return tiers

    # -- disk ---------------------------------------------------------------------------------------------

    def _task_dir(self, key: str) -> Path:
        if not STORE_KEY.fullmatch(key):
            check_task_name(split_key(key)[1])  # the user-facing message when the name is at fault
            raise InvalidTaskName(f"Invalid namespace in store key {key!r}.")
        return self.root / "tasks" / key

    def _current_version(self, task: str) -> int | None:
        pointer = self._task_dir(task) / CURRENT_FILE  # raises InvalidTaskName before any file access
        try:
            return int(pointer.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _local_keys(self, namespace: str | None = None) -> list[str]:
        return sorted(d.name for d in (self.root / "tasks").iterdir() if STORE_KEY.fullmatch(d.name)
                      and (namespace is None or split_key(d.name)[0] == namespace))

    def _sweep_staging(self) -> None:
        """Remove what an interrupted write or delete left behind; never touches served versions."""
        for sub in ("tmp", "trash"):
            for leftover in (self.root / sub).iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        for task_dir in (self.root / "tasks").iterdir():
            current = self._current_version(task_dir.name) if STORE_KEY.fullmatch(task_dir.name) else None
            if current is None:  # a first upload that never got its CURRENT pointer
                shutil.rmtree(task_dir, ignore_errors=True)
                continue
            for entry in task_dir.iterdir():
                if entry.name != CURRENT_FILE and entry.name != f"v{current}":
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            record = self._local_record(task_dir.name)
            if record is not None:
                self._disk_bytes[task_dir.name] = record.bytes

    def _write_local(self, task: str, data: bytes, make_record: Callable[[int], TaskRecord],
                     version: int | None = None, invalidate: bool = True) -> TaskRecord | None:
        """Write ``data`` as a version of ``task`` and make it current, atomically.

        ``version`` None: the next local number (the disk-only store, or Redis unreachable). Else that
        number, unless the disk already serves it or a newer one (then nothing is written: None)."""
        task_dir = self._task_dir(task)
        stage = self.root / "tmp" / uuid.uuid4().hex
        stage.mkdir()
        try:
            _fsync_write(stage / TENSOR_FILE, data)
            with self._lock:
                task_dir.mkdir(exist_ok=True)
                existing = [int(p.name[1:]) for p in task_dir.glob("v*") if p.name[1:].isdigit()]
                if version is None:
                    version = max(existing, default=0) + 1
                else:
                    current = self._current_version(task)
                    if current is not None and current >= version:
                        return None
                    if version in existing:  # a leftover that was never made current
                        shutil.rmtree(task_dir / f"v{version}", ignore_errors=True)
                record = make_record(version)
                _fsync_write(stage / META_FILE, json.dumps(record.as_json()).encode())
                _fsync_dir(stage)
                os.rename(stage, task_dir / f"v{version}")
                pointer = task_dir / f"{CURRENT_FILE}.{uuid.uuid4().hex}"
                _fsync_write(pointer, str(version).encode())
                os.replace(pointer, task_dir / CURRENT_FILE)
                _fsync_dir(task_dir)
                self._disk_bytes[task] = record.bytes
                if invalidate:
                    self._invalidate(task)
                else:  # written through from Redis: older resident copies are stale, this load is not
                    self._drop_older(task, version)
            for old in existing:  # superseded versions: the new one is durable, so they can go
                if old != version:
                    shutil.rmtree(task_dir / f"v{old}", ignore_errors=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return record

    def _delete_local(self, task: str) -> bool:
        """Remove the task from disk and memory; False when the disk did not have it."""
        task_dir = self._task_dir(task)
        with self._lock:
            self._invalidate(task)
            if self._current_version(task) is None:
                return False
            trash = self.root / "trash" / uuid.uuid4().hex
            os.rename(task_dir, trash)
            self._disk_bytes.pop(task, None)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _local_info(self, task: str) -> TaskRecord:
        for _attempt in range(3):  # a version superseded between reading CURRENT and its metadata: reread
            version = self._current_version(task)
            if version is None:
                break
            try:
                meta = json.loads((self._task_dir(task) / f"v{version}" / META_FILE).read_text())
            except FileNotFoundError:
                continue
            return TaskRecord(**meta)
        raise TaskNotFound(task)

    def _local_record(self, task: str) -> TaskRecord | None:
        try:
            return self._local_info(task)
        except (TaskNotFound, FileNotFoundError):
            return None

    def _read_current(self, task: str) -> tuple[TaskRecord, bytes]:
        # Disk alone: through info(), whose answer is the disk's. With Redis, info() answers for Redis.
        for _attempt in range(3):  # a concurrent re-upload or delete may remove the version being read
            record = (self.info if self.redis is None else self._local_info)(task)
            try:
                return record, (self._task_dir(task) / f"v{record.version}" / TENSOR_FILE).read_bytes()
            except FileNotFoundError:
                continue
        raise TaskNotFound(task)

    # -- the store's operations ---------------------------------------------------------------------------

    def put(self, task: str, artifact: PrefixArtifact) -> TaskRecord:
        self._task_dir(task)
        data = to_own_format(artifact)
        sha256 = artifact.sha256()

        def make_record(version: int) -> TaskRecord:
            return TaskRecord.describe(task, artifact, version, sha256)

        if self.redis is None:
            return self._write_local(task, data, make_record)
        try:
            version = self.redis.allocate(task, floor=self._local_floor(task))
        except RedisUnavailable:
            # Outage: a local version now, pushed to Redis by _resync once it is back (recorded first, so a
            # crash cannot lose the push; the digest tells _resync whether the write itself completed).
            self._set_pending(task, {"op": "put", "sha256": sha256, "at": time.time()})
            return self._write_local(task, data, make_record)
        record = self._write_local(task, data, make_record, version=version)
        if record is None:  # a concurrent put here got a later version onto the disk first
            return make_record(version)
        self._push(record, data)
        return record

    def _local_floor(self, task: str) -> int:
        task_dir = self._task_dir(task)
        if not task_dir.is_dir():
            return 0
        return max((int(p.name[1:]) for p in task_dir.glob("v*") if p.name[1:].isdigit()), default=0)

    def _push(self, record: TaskRecord, data: bytes) -> None:
        """Publish a version written to disk here; recorded as pending when Redis is unreachable."""
        try:
            self.redis.publish(record.as_json(), data, record.namespace)
        except RedisUnavailable:
            self._set_pending(record.task, {"op": "put", "sha256": record.sha256, "at": record.created_at})
            return
        self._clear_pending(record.task)  # this write supersedes an older unpushed one

    def info(self, task: str) -> TaskRecord:
        if self.redis is None:
            return self._local_info(task)
        remote, reachable = self._probe(task)
        record = self._resolve(task, remote, reachable, self._local_record(task))
        if record is None:
            raise self._not_found(task, reachable)
        return record

    def _not_found(self, task: str, reachable: bool) -> Exception:
        """What a miss means: the task does not exist, or (Redis unreachable) nobody here can tell."""
        if self.redis is None or reachable or self._pending.get(task, {}).get("op") == "delete":
            return TaskNotFound(task)  # (a delete made here during the outage is known)
        return StoreUnavailable(task, max(1, math.ceil(self.redis.retry_in)))

    def list(self, namespace: str | None = None) -> list[TaskRecord]:
        """Every task, or only those whose key is in ``namespace``."""
        keys = self._local_keys(namespace)
        if self.redis is None:
            records = []
            for key in keys:
                try:
                    records.append(self.info(key))
                except (TaskNotFound, InvalidTaskName, FileNotFoundError):
                    continue
            return records
        local = set(keys)
        try:
            remote_keys = {k for k in self.redis.keys()
                           if STORE_KEY.fullmatch(k) and (namespace is None or split_key(k)[0] == namespace)}
            states, reachable = self.redis.probe_many(sorted(local | remote_keys)), True
        except RedisUnavailable:
            remote_keys, states, reachable = set(), {}, False
        records = []
        for key in sorted(local | remote_keys):
            record = self._resolve(key, states.get(key), reachable,
                                   self._local_record(key) if key in local else None)
            if record is not None:
                records.append(record)
        return records

    def delete(self, task: str) -> None:
        task_dir = self._task_dir(task)
        if self.redis is None:
            with self._lock:
                if self._current_version(task) is None:
                    raise TaskNotFound(task)
                trash = self.root / "trash" / uuid.uuid4().hex
                os.rename(task_dir, trash)
                self._disk_bytes.pop(task, None)
                self._invalidate(task)
            shutil.rmtree(trash, ignore_errors=True)
            return
        remote, reachable = self._probe(task)
        local = self._local_record(task)
        if self._resolve(task, remote, reachable, local) is None:
            raise self._not_found(task, reachable)
        floor = max(local.version if local else 0, remote.version if remote else 0)
        try:
            if not reachable:
                raise RedisUnavailable("unreachable")
            self.redis.delete(task, floor=floor, force=True)
            self._clear_pending(task)
        except RedisUnavailable:  # outage: delete here, tombstone Redis once it is back (_resync)
            self._set_pending(task, {"op": "delete", "version": floor, "at": time.time()})
        self._delete_local(task)

    def read_artifact(self, task: str) -> bytes:
        """The current version's file, in prefix-serve's format."""
        if self.redis is not None:
            remote, reachable = self._probe(task)
            local = self._local_record(task)
            want = self._resolve(task, remote, reachable, local)
            if want is None:
                raise self._not_found(task, reachable)
            if not _same(want, local):
                try:
                    fetched = self._fetch(task)
                except RedisUnavailable:
                    fetched = None
                if fetched is not None:
                    return fetched[1]
        return self._read_current(task)[1]

    # -- Redis: which version is current ------------------------------------------------------------------

    def _probe(self, task: str) -> tuple[RemoteState | None, bool]:
        """(Redis's state of the task, whether Redis answered); (None, False) without Redis."""
        if self.redis is None:
            return None, False
        try:
            return self.redis.probe(task), True
        except RedisUnavailable:
            return None, False

    def _resolve(self, task: str, remote: RemoteState | None, reachable: bool,
                 local: TaskRecord | None) -> TaskRecord | None:
        """The record to serve, given Redis's state and a local one (disk or resident); None: not found.

        Redis decides, except where this replica holds a write Redis has not seen: Redis unreachable or
        without the task, a pending outage write later than Redis's last write, or a local version above
        Redis's (written here, not yet published)."""
        if not reachable:
            return local
        pending = self._pending.get(task)
        if pending is not None:
            if remote is None or remote.at <= pending["at"]:  # the outage write is the last one
                return local if pending["op"] == "put" else None
        elif remote is None or (local is not None and local.version > remote.version):
            return local
        return None if remote.deleted else TaskRecord(**remote.meta)

    def _fetch(self, task: str, lookup: bool = True) -> tuple[TaskRecord, bytes, PrefixArtifact] | None:
        """Load the live version from Redis, check its digest and write it through to the local disk.
        None when Redis has no live version (or a corrupt one); raises RedisUnavailable. ``lookup``: a
        request's load (counted in the tier's stats), not a background refresh."""
        start = time.perf_counter()
        fetched = self.redis.fetch(task)
        if fetched is None:
            with self._lock:
                self.redis_stats.misses += lookup
            return None
        state, data = fetched
        record = TaskRecord(**state.meta)
        try:
            artifact = from_own_format(data, f"{task} v{record.version} (redis)")
            if artifact.sha256() != record.sha256:
                raise InvalidArtifact("its tensor does not match the sha256 of its record")
        except InvalidArtifact as exc:
            log.error("Redis copy of task %s v%s is unusable (%s): serving from the local disk", task,
                      record.version, exc)
            with self._lock:
                self.redis_stats.misses += lookup
            return None
        if lookup:
            with self._lock:
                self.redis_stats.hits += 1
                self.redis_stats.load_seconds_total += time.perf_counter() - start
        self._install(record, data)
        return record, data, artifact

    def _install(self, record: TaskRecord, data: bytes) -> None:
        """Write a version loaded from Redis to the local disk, so it survives a Redis outage."""
        task = record.task
        local = self._local_record(task)
        if local is not None and (local.version > record.version or _same(local, record)):
            return
        try:
            if local is not None and local.version == record.version:  # same number, other tensor: Redis wins
                self._delete_local(task)
            self._write_local(task, data, lambda _version: record, version=record.version, invalidate=False)
            self._clear_pending(task)  # Redis's later write won over an unpushed one
        except OSError as exc:
            log.warning("could not write task %s v%s to the local disk (%s); it is still served",
                        task, record.version, exc)

    # -- memory tiers -------------------------------------------------------------------------------------

    def get(self, task: str) -> ResidentPrefix:
        """The task's current version: from device memory when resident and current, else loaded from the
        nearest tier that has it (host memory, local disk, Redis)."""
        self._task_dir(task)
        remote, reachable = self._probe(task)
        with self._lock:
            generation = self._generation.get(task, 0)
            resident = self._device.get(task)
            if resident is not None:
                if self.redis is None or _same(self._resolve(task, remote, reachable, resident.record),
                                               resident.record):
                    self.stats.hits += 1
                    return resident
                self._device.drop(task)  # superseded or deleted on another replica
            self.stats.misses += 1
        start = time.perf_counter()
        record, kind, tensor = self._load(task, remote, reachable)
        resident = ResidentPrefix(record, kind, self.prepare(tensor))
        with self._lock:
            self.stats.load_seconds_total += time.perf_counter() - start
            current = self._generation.get(task, 0) == generation \
                and record.version >= self._announced.get(task, 0)  # not replaced or deleted meanwhile
            if current and (self.redis is not None or self._current_version(task) == record.version):
                self._device.admit(task, resident)
        return resident

    def _load(self, task: str, remote: RemoteState | None, reachable: bool) -> tuple[TaskRecord, PrefixKind,
                                                                                     torch.Tensor]:
        """The current version's record, kind and CPU tensor, from the nearest tier that holds that exact
        version: host memory, the local disk, then Redis (which says which version is current)."""
        want = local = None
        if self.redis is not None:
            local = self._local_record(task)
            want = self._resolve(task, remote, reachable, local)
            if want is None:
                if reachable and local is not None and remote is not None and remote.deleted \
                        and remote.version >= local.version and task not in self._pending:
                    self._delete_local(task)  # deleted on another replica: the local copy must go
                with self._lock:
                    self.disk_stats.misses += 1
                raise self._not_found(task, reachable)
        if self.host_cache_bytes > 0:
            start = time.perf_counter()
            with self._lock:
                entry = self._host.get(task)
                if entry is not None and (want is None or _same(entry.record, want)):
                    self.host_stats.hits += 1
                    self.host_stats.load_seconds_total += time.perf_counter() - start
                    return entry.record, entry.kind, entry.tensor
                self.host_stats.misses += 1
        loaded = None
        if self.redis is not None and not reachable:
            with self._lock:
                self.redis_stats.misses += 1  # could not even tell which version is current
        if want is not None and not _same(want, local):  # the local disk lacks the current version
            try:
                fetched = self._fetch(task)
            except RedisUnavailable:
                fetched = None
                with self._lock:
                    self.redis_stats.misses += 1
            if fetched is not None:
                with self._lock:
                    self.disk_stats.misses += 1
                loaded = fetched[0], fetched[2]
        if loaded is None:  # the local disk holds the current version (or Redis could not help: serve ours)
            start = time.perf_counter()
            try:
                record, data = self._read_current(task)
            except TaskNotFound:
                with self._lock:
                    self.disk_stats.misses += 1
                raise
            loaded = record, from_own_format(data, f"{task} v{record.version}")
            with self._lock:
                self.disk_stats.hits += 1
                self.disk_stats.load_seconds_total += time.perf_counter() - start
        record, artifact = loaded
        if self.host_cache_bytes > 0:
            self._admit_host(task, record, artifact)
        return record, artifact.kind, artifact.tensor

    def _admit_host(self, task: str, record: TaskRecord, artifact: PrefixArtifact) -> None:
        tensor = artifact.tensor
        if torch.cuda.is_available():
            try:
                tensor = tensor.pin_memory()  # faster, asynchronous-capable copies to the device
            except RuntimeError:
                pass
        with self._lock:
            self._host.admit(task, ResidentPrefix(record, artifact.kind, tensor))

    def _invalidate(self, task: str) -> None:
        """Drop the task from the memory tiers; loads already under way are not admitted (call locked)."""
        self._device.drop(task)
        self._host.drop(task)
        self._generation[task] = self._generation.get(task, 0) + 1

    def _drop_older(self, task: str, version: int) -> None:
        for tier in (self._device, self._host):
            item = tier.items.get(task)
            if item is not None and item.record.version < version:
                tier.drop(task)

    # -- Redis: events, outage bookkeeping and reconciliation ---------------------------------------------

    def _on_event(self, op: str, task: str, version: int) -> None:
        """Another replica wrote ``version`` of ``task`` (listener thread)."""
        if not STORE_KEY.fullmatch(task):
            return
        with self._lock:
            for tier in (self._device, self._host):
                item = tier.items.get(task)
                if item is not None and (item.record.version < version or op == "delete"):
                    tier.drop(task)
            if op == "delete":
                self._generation[task] = self._generation.get(task, 0) + 1
            else:
                self._announced[task] = max(self._announced.get(task, 0), version)
        if task in self._pending:
            return  # an unpushed local write: _resync decides
        local = self._local_record(task)
        if local is None or local.version >= version:
            return
        if op == "delete":
            self._delete_local(task)
        else:  # keep the local copy current, for the next outage
            try:
                self._fetch(task, lookup=False)
            except RedisUnavailable:
                pass

    def _load_pending(self) -> None:
        for path in (self.root / "pending").iterdir():
            key = path.name.removesuffix(".json")
            try:
                marker = json.loads(path.read_text())
                if not STORE_KEY.fullmatch(key) or marker["op"] not in ("put", "delete"):
                    raise ValueError(f"unexpected marker {marker!r}")
                float(marker["at"])
            except (ValueError, KeyError, TypeError, OSError) as exc:  # a torn temporary file, or not ours
                log.warning("ignoring %s (%s)", path, exc)
                path.unlink(missing_ok=True)
                continue
            self._pending[key] = marker

    def _set_pending(self, task: str, marker: dict) -> None:
        tmp = self.root / "pending" / f".{uuid.uuid4().hex}.tmp"
        _fsync_write(tmp, json.dumps(marker).encode())
        os.replace(tmp, self.root / "pending" / f"{task}.json")
        _fsync_dir(self.root / "pending")
        self._pending[task] = marker

    def _clear_pending(self, task: str) -> None:
        if self._pending.pop(task, None) is not None:
            (self.root / "pending" / f"{task}.json").unlink(missing_ok=True)

    def _resync(self) -> None:
        """Reconcile the local disk with Redis (listener thread, after each (re)subscription)."""
        keys = sorted(set(self._local_keys()) | set(self._pending))
        states = self.redis.probe_many(keys)
        for key in keys:
            try:
                self._reconcile(key, states[key])
            except RedisUnavailable:
                raise
            except Exception:  # noqa: BLE001 - one task must not stop the others
                log.exception("reconciling task %s with Redis failed", key)

    def _reconcile(self, key: str, remote: RemoteState | None) -> None:
        local = self._local_record(key)
        pending = self._pending.get(key)
        if pending is not None:
            if remote is not None and remote.at > pending["at"]:
                log.warning("the %s of task %s made here while Redis was unreachable was superseded by a "
                            "later write on another replica", pending["op"], key)
                if local is not None:  # whatever its version number, the outage write lost: take Redis's
                    self._delete_local(key)
                self._clear_pending(key)
                if not remote.deleted:
                    self._fetch(key, lookup=False)
                return
            if pending["op"] == "put":
                if local is not None and local.sha256 == pending["sha256"]:
                    # A fresh version above anything Redis has seen; created_at stays the upload's time.
                    floor = max(local.version, remote.version if remote else 0)
                    version = self.redis.allocate(key, floor=floor)
                    record = dataclasses.replace(local, version=version)
                    data = (self._task_dir(key) / f"v{local.version}" / TENSOR_FILE).read_bytes()
                    written = self._write_local(key, data, lambda _version: record, version=version)
                    if written is not None:
                        self.redis.publish(record.as_json(), data, record.namespace)
                        log.info("pushed task %s (uploaded while Redis was unreachable) as v%d", key, version)
                self._clear_pending(key)
                return
            else:
                if remote is None or not remote.deleted:
                    # A tombstone even when Redis lost the task: older copies pushed back later lose to it.
                    floor = max(remote.version if remote else 0, int(pending.get("version", 0)))
                    self.redis.delete(key, floor=floor, force=True, at=pending["at"])
                    log.info("pushed the delete of task %s (made while Redis was unreachable)", key)
                self._delete_local(key)
                self._clear_pending(key)
                return
        if local is None:
            return
        if remote is None or remote.version < local.version:  # Redis lost it, or never got it
            data = (self._task_dir(key) / f"v{local.version}" / TENSOR_FILE).read_bytes()
            if self.redis.publish(local.as_json(), data, local.namespace):
                return
            remote = self.redis.probe(key)  # another replica got there first: follow Redis
            if remote is None:
                return
        if remote.deleted:
            if remote.version >= local.version:
                self._delete_local(key)
        elif not _same(local, TaskRecord(**remote.meta)):
            self._fetch(key, lookup=False)
