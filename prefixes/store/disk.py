"""The disk tier: each replica's durable, versioned copy of its tasks, always written.

Layout under ``root``::

    tasks/<key>/v<version>/prefix.safetensors   canonical tensors (prefix-serve format)
    tasks/<key>/v<version>/meta.json            the TaskRecord
    tasks/<key>/CURRENT                         the served version number
    deleted/<key>.json                          a deleted task's last version number (and when): the
                                                high-water mark, so a name's versions never restart at 1
    tmp/  trash/                                staging for atomic writes and deletes
    pending/<key>.json                          (Redis only) a write made while Redis was unreachable

A version directory is fully written and fsynced in ``tmp/`` (tensors, record and the next ``CURRENT``)
before one ``rename`` puts it in place, and ``CURRENT`` changes by ``os.replace``: once staged, making a
version current allocates no space, so a full disk refuses a write before anything changed. A crash at any
point leaves either the old version or the new one served, never a half-written file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefixes.artifact import PrefixArtifact
from prefixes.formats import from_own_format
from prefixes.keys import STORE_KEY, check_key, in_namespace
from prefixes.records import TaskRecord
from prefixes.store.errors import TaskNotFound
from prefixes.store.memory import CacheStats, Residency

TENSOR_FILE = "prefix.safetensors"
META_FILE = "meta.json"
CURRENT_FILE = "CURRENT"
NEXT_CURRENT_FILE = "CURRENT.next"  # staged in a version folder, moved over CURRENT to make it current

log = logging.getLogger(__name__)

MakeRecord = Callable[[int], TaskRecord]  # the record of a version, given the number it is written as


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A task deleted from this disk: the last version number its name had (a deleted version, or the
    tombstone version Redis gave the delete) and when."""

    version: int
    at: float


class DiskTier:
    def __init__(self, root: Path, lock: threading.Lock, residency: Residency):
        """``lock``: the store's, held while a version is made current or removed, together with the memory
        tiers' invalidation (``residency``), so a load begun before the change is never admitted after it."""
        self.root = root
        self.lock = lock
        self.residency = residency
        self.stats = CacheStats()
        self._bytes: dict[str, int] = {}  # key -> bytes of its current version
        for sub in ("tasks", "tmp", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_staging()

    def path(self, key: str) -> Path:
        return self.root / "tasks" / check_key(key)

    def current_version(self, key: str) -> int | None:
        pointer = self.path(key) / CURRENT_FILE  # raises InvalidTaskName before any file access
        try:
            return int(pointer.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def keys(self, namespace: str | None = None) -> list[str]:
        return sorted(d.name for d in (self.root / "tasks").iterdir() if in_namespace(d.name, namespace))

    def floor(self, key: str) -> int:
        """The highest version number this disk has used or seen deleted for ``key`` (0: none)."""
        tombstone = self.tombstone(key)
        return max(self._version_dirs(key) + [tombstone.version if tombstone else 0])

    def _version_dirs(self, key: str) -> list[int]:
        task_dir = self.path(key)
        if not task_dir.is_dir():
            return []
        return [int(p.name[1:]) for p in task_dir.glob("v*") if p.name[1:].isdigit()]

    # -- tombstones: the high-water mark of deleted names ------------------------------------------------

    def _tombstone_path(self, key: str) -> Path:
        return self.root / "deleted" / f"{check_key(key)}.json"

    def tombstone(self, key: str) -> Tombstone | None:
        try:
            fields = json.loads(self._tombstone_path(key).read_text())
            return Tombstone(int(fields["version"]), float(fields["at"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:  # torn or not ours: the version dirs still count
            log.warning("ignoring the unreadable tombstone of %s (%s)", key, exc)
            return None

    def tombstones(self) -> dict[str, Tombstone]:
        """Every deleted name this disk remembers (for pushing deletes back to a Redis that lost them)."""
        folder = self.root / "deleted"
        out: dict[str, Tombstone] = {}
        for path in folder.glob("*.json") if folder.is_dir() else ():
            key = path.name.removesuffix(".json")
            if STORE_KEY.fullmatch(key) and (tombstone := self.tombstone(key)) is not None:
                out[key] = tombstone
        return out

    def remember_delete(self, key: str, version: int, at: float | None = None) -> None:
        """Record that ``key`` was deleted at ``version`` (kept when a higher one is already recorded)."""
        known = self.tombstone(key)
        if known is not None and known.version >= version:
            return
        folder = self.root / "deleted"
        folder.mkdir(exist_ok=True)  # made on first use: a store opened read-only needs no new folder
        tmp = folder / f".{uuid.uuid4().hex}.tmp"
        try:
            when = time.time() if at is None else at
            fsync_write(tmp, json.dumps({"version": version, "at": when}).encode())
            os.replace(tmp, self._tombstone_path(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(folder)

    def _drop_tombstone(self, key: str, below: int) -> None:
        """A live version ``below`` and up now carries the high-water mark: the tombstone can go."""
        tombstone = self.tombstone(key)
        if tombstone is not None and tombstone.version < below:
            self._tombstone_path(key).unlink(missing_ok=True)

    def _sweep_staging(self) -> None:
        """Remove what an interrupted write or delete left behind; never touches served versions."""
        for sub in ("tmp", "trash"):
            for leftover in (self.root / sub).iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        for task_dir in (self.root / "tasks").iterdir():
            current = self.current_version(task_dir.name) if STORE_KEY.fullmatch(task_dir.name) else None
            if current is None:  # a first upload that never got its CURRENT pointer
                shutil.rmtree(task_dir, ignore_errors=True)
                continue
            for entry in task_dir.iterdir():
                if entry.name != CURRENT_FILE and entry.name != f"v{current}":
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            record = self.record(task_dir.name)
            if record is not None:
                self._bytes[task_dir.name] = record.bytes

    # -- writes -----------------------------------------------------------------------------------------

    def stage(self, data: bytes) -> Path:
        """A staging folder in ``tmp/`` holding ``data`` as the tensor file, fsynced; :meth:`commit` it, or
        :meth:`discard` it."""
        stage = self.root / "tmp" / uuid.uuid4().hex
        stage.mkdir()
        try:
            fsync_write(stage / TENSOR_FILE, data)
        except BaseException:
            self.discard(stage)
            raise
        return stage

    @staticmethod
    def discard(stage: Path) -> None:
        shutil.rmtree(stage, ignore_errors=True)

    @staticmethod
    def prepare(stage: Path, record: TaskRecord) -> None:
        """Write the version's record and its ``CURRENT`` into the stage, fsynced: what is left for
        :meth:`commit` then needs no space (a full disk fails here, before Redis is told of the version)."""
        fsync_write(stage / META_FILE, json.dumps(record.as_json()).encode())
        fsync_write(stage / NEXT_CURRENT_FILE, str(record.version).encode())
        fsync_dir(stage)

    @staticmethod
    def _prepared(stage: Path, record: TaskRecord) -> bool:
        try:
            return (json.loads((stage / META_FILE).read_text()) == record.as_json()
                    and (stage / NEXT_CURRENT_FILE).read_text() == str(record.version))
        except (FileNotFoundError, ValueError):
            return False

    def commit(self, key: str, stage: Path, make_record: MakeRecord, version: int | None = None,
               invalidate: bool = True) -> TaskRecord | None:
        """Make a staged file a version of ``key`` and current, atomically; the stage is consumed.

        ``version`` None: the next local number, above every number the name had, deleted ones too (the
        disk-only store, or Redis unreachable). Else that number, unless the disk already serves it or a
        newer one (then nothing is written: None).
        ``invalidate`` False: a version written through from Redis, which drops only older resident copies."""
        task_dir = self.path(key)
        try:
            with self.lock:
                task_dir.mkdir(exist_ok=True)
                existing = self._version_dirs(key)
                if version is None:
                    version = self.floor(key) + 1
                else:
                    current = self.current_version(key)
                    if current is not None and current >= version:
                        return None
                    if version in existing:  # a leftover that was never made current
                        shutil.rmtree(task_dir / f"v{version}", ignore_errors=True)
                record = make_record(version)
                if not self._prepared(stage, record):
                    self.prepare(stage, record)
                os.rename(stage, task_dir / f"v{version}")
                os.replace(task_dir / f"v{version}" / NEXT_CURRENT_FILE, task_dir / CURRENT_FILE)
                fsync_dir(task_dir)
                self._bytes[key] = record.bytes
                if invalidate:
                    self.residency.invalidate(key)
                else:
                    self.residency.supersede(key, version)
            for old in existing:  # superseded versions: the new one is durable, so they can go
                if old != version:
                    shutil.rmtree(task_dir / f"v{old}", ignore_errors=True)
            self._drop_tombstone(key, below=version + 1)
        finally:
            self.discard(stage)
        return record

    def write(self, key: str, data: bytes, make_record: MakeRecord, version: int | None = None,
              invalidate: bool = True) -> TaskRecord | None:
        """:meth:`stage` then :meth:`commit`."""
        self.path(key)
        return self.commit(key, self.stage(data), make_record, version, invalidate)

    def delete(self, key: str, version: int = 0, at: float | None = None, remember: bool = True) -> bool:
        """Remove the task from disk and memory, remembering the name's last version (``version``, e.g. the
        tombstone's from Redis, or the local one if higher) so it is never handed out again; False when the
        disk did not have the task (the version is still remembered). ``remember`` False: not a delete
        (a local copy replaced by Redis's version of it), nothing is remembered."""
        task_dir = self.path(key)
        floor = max(version, self.floor(key)) if remember else 0
        full = False
        if floor:
            try:
                self.remember_delete(key, floor, at)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                full = True  # a delete must work on a full disk: remembered once the task's space is free
        with self.lock:
            self.residency.invalidate(key)
            if self.current_version(key) is None:
                return False
            trash = self.root / "trash" / uuid.uuid4().hex
            os.rename(task_dir, trash)
            self._bytes.pop(key, None)
        shutil.rmtree(trash, ignore_errors=True)
        if full:
            try:
                self.remember_delete(key, floor, at)
            except OSError as exc:
                log.warning("task %s deleted, but its last version number (%d) could not be kept (%s)",
                            key, floor, exc)
        return True

    # -- reads ------------------------------------------------------------------------------------------

    def info(self, key: str) -> TaskRecord:
        for _attempt in range(3):  # a version superseded between reading CURRENT and its metadata: reread
            version = self.current_version(key)
            if version is None:
                break
            try:
                meta = json.loads((self.path(key) / f"v{version}" / META_FILE).read_text())
            except FileNotFoundError:
                continue
            return TaskRecord.from_json(meta)
        raise TaskNotFound(key)

    def record(self, key: str) -> TaskRecord | None:
        try:
            return self.info(key)
        except (TaskNotFound, FileNotFoundError):
            return None

    def read_version(self, key: str, version: int) -> bytes:
        return (self.path(key) / f"v{version}" / TENSOR_FILE).read_bytes()

    def read(self, key: str) -> tuple[TaskRecord, bytes]:
        """The current version's record and file."""
        for _attempt in range(3):  # a concurrent re-upload or delete may remove the version being read
            record = self.info(key)
            try:
                return record, self.read_version(key, record.version)
            except FileNotFoundError:
                continue
        raise TaskNotFound(key)

    def load(self, key: str) -> tuple[TaskRecord, PrefixArtifact]:
        """The current version, parsed: a request's load, counted as this tier's hit or miss."""
        start = time.perf_counter()
        try:
            record, data = self.read(key)
        except TaskNotFound:
            self.miss()
            raise
        artifact = from_own_format(data, f"{key} v{record.version}")
        with self.lock:
            self.stats.hits += 1
            self.stats.load_seconds_total += time.perf_counter() - start
        return record, artifact

    def miss(self) -> None:
        """A request's load that this disk could not serve (absent, or not the current version)."""
        with self.lock:
            self.stats.misses += 1

    def report(self, into: dict[str, CacheStats]) -> None:
        with self.lock:
            self.stats.resident_bytes = sum(self._bytes.values())
            self.stats.resident_tasks = len(self._bytes)
        into["disk"] = self.stats
