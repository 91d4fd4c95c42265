"""Durable task store on disk plus a byte-budgeted in-memory LRU of serving-ready prefixes.

Disk layout under ``root``::

    tasks/<task>/v<version>/prefix.safetensors   canonical tensors (prefix-serve format)
    tasks/<task>/v<version>/meta.json            the TaskRecord
    tasks/<task>/CURRENT                         the served version number
    tmp/  trash/                                 staging for atomic writes and deletes

A version directory is fully written and fsynced in ``tmp/`` before one ``rename`` puts it in place, and
``CURRENT`` changes by ``os.replace``. A crash at any point leaves either the old version or the new one
served, never a half-written file.
"""

from __future__ import annotations

import json
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
from prefixes.formats import from_own_format, to_own_format

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


class PrefixStore:
    def __init__(self, root: Path, cache_bytes: int, prepare: Callable[[torch.Tensor], torch.Tensor]):
        """``prepare`` moves a loaded tensor to the serving device and dtype (called once per load)."""
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self.prepare = prepare
        self.stats = CacheStats()
        self._resident: OrderedDict[str, ResidentPrefix] = OrderedDict()
        self._lock = threading.Lock()  # guards _resident, stats and version allocation
        for sub in ("tasks", "tmp", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_staging()

    # -- disk ---------------------------------------------------------------------------------------------

    def tier_stats(self) -> dict[str, CacheStats]:
        """Counters per tier, for metrics."""
        return {"memory": self.stats}

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

    def put(self, task: str, artifact: PrefixArtifact) -> TaskRecord:
        task_dir = self._task_dir(task)
        data = to_own_format(artifact)
        stage = self.root / "tmp" / uuid.uuid4().hex
        stage.mkdir()
        try:
            _fsync_write(stage / TENSOR_FILE, data)
            with self._lock:
                task_dir.mkdir(exist_ok=True)
                existing = [int(p.name[1:]) for p in task_dir.glob("v*") if p.name[1:].isdigit()]
                version = max(existing, default=0) + 1
                record = TaskRecord(
                    task=task, kind=artifact.kind.value, num_virtual_tokens=artifact.num_virtual_tokens,
                    sha256=artifact.sha256(), version=version, bytes=artifact.nbytes,
                    source_format=artifact.source_format, created_at=time.time(),
                )
                _fsync_write(stage / META_FILE, json.dumps(record.as_json()).encode())
                _fsync_dir(stage)
                os.rename(stage, task_dir / f"v{version}")
                pointer = task_dir / f"{CURRENT_FILE}.{uuid.uuid4().hex}"
                _fsync_write(pointer, str(version).encode())
                os.replace(pointer, task_dir / CURRENT_FILE)
                _fsync_dir(task_dir)
                self._drop_resident(task)
            for old in existing:  # superseded versions: the new one is durable, so they can go
                shutil.rmtree(task_dir / f"v{old}", ignore_errors=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return record

    def info(self, task: str) -> TaskRecord:
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

    def list(self, namespace: str | None = None) -> list[TaskRecord]:
        """Every task, or only those whose key is in ``namespace``."""
        records = []
        for task_dir in sorted((self.root / "tasks").iterdir()):
            if namespace is not None and split_key(task_dir.name)[0] != namespace:
                continue
            try:
                records.append(self.info(task_dir.name))
            except (TaskNotFound, InvalidTaskName, FileNotFoundError):
                continue
        return records

    def delete(self, task: str) -> None:
        task_dir = self._task_dir(task)
        with self._lock:
            if self._current_version(task) is None:
                raise TaskNotFound(task)
            trash = self.root / "trash" / uuid.uuid4().hex
            os.rename(task_dir, trash)
            self._drop_resident(task)
        shutil.rmtree(trash, ignore_errors=True)

    def _read_current(self, task: str) -> tuple[TaskRecord, bytes]:
        for _attempt in range(3):  # a concurrent re-upload or delete may remove the version being read
            record = self.info(task)
            try:
                return record, (self._task_dir(task) / f"v{record.version}" / TENSOR_FILE).read_bytes()
            except FileNotFoundError:
                continue
        raise TaskNotFound(task)

    def read_artifact(self, task: str) -> bytes:
        """The current version's file, in prefix-serve's format."""
        return self._read_current(task)[1]

    # -- memory tier --------------------------------------------------------------------------------------

    def get(self, task: str) -> ResidentPrefix:
        """The task's current version, from memory when resident, else loaded from disk."""
        with self._lock:
            resident = self._resident.get(task)
            if resident is not None:
                self._resident.move_to_end(task)
                self.stats.hits += 1
                return resident
            self.stats.misses += 1
        start = time.perf_counter()
        record, data = self._read_current(task)
        artifact = from_own_format(data, f"{task} v{record.version}")
        resident = ResidentPrefix(record, artifact.kind, self.prepare(artifact.tensor))
        with self._lock:
            self.stats.load_seconds_total += time.perf_counter() - start
            if self._current_version(task) == record.version:  # not replaced or deleted meanwhile
                self._admit(task, resident)
        return resident

    def _admit(self, task: str, resident: ResidentPrefix) -> None:
        self._drop_resident(task)
        size = resident.tensor.numel() * resident.tensor.element_size()
        if size > self.cache_bytes:
            return  # served to this request, but too large to keep
        while self._resident and self.stats.resident_bytes + size > self.cache_bytes:
            _, evicted = self._resident.popitem(last=False)
            self.stats.resident_bytes -= evicted.tensor.numel() * evicted.tensor.element_size()
            self.stats.evictions += 1
        self._resident[task] = resident
        self.stats.resident_bytes += size
        self.stats.resident_tasks = len(self._resident)

    def _drop_resident(self, task: str) -> None:
        dropped = self._resident.pop(task, None)
        if dropped is not None:
            self.stats.resident_bytes -= dropped.tensor.numel() * dropped.tensor.element_size()
        self.stats.resident_tasks = len(self._resident)
