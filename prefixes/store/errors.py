"""The store's domain errors and the quota it enforces with a write. The HTTP layer maps them to statuses."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefixes.keys import split_key


class TaskNotFound(KeyError):
    pass


class StoreUnavailable(RuntimeError):
    """Redis, which decides which tasks exist, cannot be reached and this replica holds no copy of the task:
    whether it exists is unknown until Redis is back (in about ``retry_after`` seconds)."""

    def __init__(self, key: str, retry_after: int):
        super().__init__(f"Task {split_key(key)[1]!r} is not on this replica and the shared store (Redis) is "
                         f"unreachable; retry in {retry_after} s.")
        self.key = key
        self.retry_after = retry_after


class QuotaExceeded(RuntimeError):
    """A write refused because it would take its namespace over its task count or bytes."""


class StorageFull(RuntimeError):
    """A write refused because a storage tier ran out of room: the local disk (ENOSPC, EDQUOT) or Redis's
    memory (``maxmemory`` with ``noeviction``). Nothing of the write was kept; earlier tasks are intact."""


class StoreReadOnly(RuntimeError):
    """A write refused because the store cannot be written at all: a read-only local disk (EROFS) or a
    read-only Redis (a replica, e.g. after a failover). Reads keep being served."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_faults(action: str) -> Iterator[None]:
    """Turn the local disk running out of space, or being read-only, during ``action`` (e.g. "storing task
    'x'") into StorageFull or StoreReadOnly. Other OSErrors pass as they are (a bug or a broken disk)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise StorageFull(f"The server's task store (its --store-dir disk) is full ({exc.strerror}): "
                              f"{action} failed and nothing of it was kept; earlier tasks are intact. Free "
                              "space there, or delete tasks.") from exc
        if exc.errno == errno.EROFS:
            raise StoreReadOnly(f"The server's task store (its --store-dir disk) is read-only: {action} "
                                "failed; earlier tasks are intact and still served.") from exc
        raise


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits on one namespace's live tasks (None: no limit). A replaced task's old bytes count out."""

    max_tasks: int | None = None
    max_bytes: int | None = None

    @property
    def limits(self) -> bool:
        return self.max_tasks is not None or self.max_bytes is not None

    def check(self, namespace: str | None, other_tasks: int, other_bytes: int, new_bytes: int) -> None:
        """Raise QuotaExceeded when ``new_bytes`` more, next to ``other_tasks`` tasks of ``other_bytes`` (the
        namespace's live tasks but the one being written), would break a limit."""
        if self.max_tasks is not None and other_tasks + 1 > self.max_tasks:
            raise QuotaExceeded(f"Tenant {namespace!r} already has {other_tasks} tasks, its quota is "
                                f"{self.max_tasks}: delete one first.")
        used = other_bytes + new_bytes
        if self.max_bytes is not None and used > self.max_bytes:
            raise QuotaExceeded(f"Storing this task would use {used} bytes, over tenant {namespace!r}'s "
                                f"quota of {self.max_bytes}: delete tasks or use fewer virtual tokens.")
