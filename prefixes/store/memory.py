"""The memory tiers: byte-budgeted LRUs of tasks ready to serve, fastest first.

``memory``  device memory (``cache_bytes``): tensors already on the serving device and dtype (``prepare``).
``host``    host memory, only when serving on an accelerator (``host_cache_bytes`` > 0): CPU tensors (pinned
            when CUDA is there), so a task evicted from device memory comes back without touching Redis
            or disk. Without it the store holds a :class:`NoCache` in its place.

Every method here is called with the store's lock held; each tier's CacheStats change only here.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from prefixes.records import ResidentPrefix, TaskRecord


@dataclasses.dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    resident_tasks: int = 0
    load_seconds_total: float = 0.0


class LRU:
    """A byte-budgeted LRU of ``key -> ResidentPrefix`` that keeps its tier's CacheStats current."""

    def __init__(self, name: str, budget: int):
        self.name = name
        self.budget = budget
        self.stats = CacheStats()
        self.items: OrderedDict[str, ResidentPrefix] = OrderedDict()

    def lookup(self, key: str, current: Callable[[TaskRecord], bool]) -> ResidentPrefix | None:
        """The resident copy when ``current(its record)``, counted as a hit; else a miss (a stale copy is
        dropped). The time a hit takes counts as this tier's load time."""
        start = time.perf_counter()
        item = self.items.get(key)
        if item is not None and current(item.record):
            self.items.move_to_end(key)
            self.stats.hits += 1
            self.stats.load_seconds_total += time.perf_counter() - start
            return item
        if item is not None:
            self.drop(key)
        self.stats.misses += 1
        return None

    def loaded(self, seconds: float) -> None:
        """A miss was filled from a lower tier in ``seconds``."""
        self.stats.load_seconds_total += seconds

    def admit(self, key: str, item: ResidentPrefix) -> None:
        self.drop(key)
        size = item.nbytes
        if size > self.budget:
            return  # served to this request, but too large to keep
        while self.items and self.stats.resident_bytes + size > self.budget:
            _, evicted = self.items.popitem(last=False)
            self.stats.resident_bytes -= evicted.nbytes
            self.stats.evictions += 1
        self.items[key] = item
        self.stats.resident_bytes += size
        self.stats.resident_tasks = len(self.items)

    def drop(self, key: str) -> None:
        dropped = self.items.pop(key, None)
        if dropped is not None:
            self.stats.resident_bytes -= dropped.nbytes
        self.stats.resident_tasks = len(self.items)

    def drop_older(self, key: str, version: int) -> None:
        item = self.items.get(key)
        if item is not None and item.record.version < version:
            self.drop(key)

    def report(self, into: dict[str, CacheStats]) -> None:
        into[self.name] = self.stats


class HostLRU(LRU):
    """The host tier: keeps CPU tensors, pinned when CUDA is there."""

    def keepable(self, item: ResidentPrefix) -> ResidentPrefix:
        """``item`` as this tier keeps it; call before ``admit``, without the store's lock (it copies)."""
        if not torch.cuda.is_available():
            return item
        try:
            return dataclasses.replace(item, tensor=item.tensor.pin_memory())  # faster, asynchronous copies
        except RuntimeError:
            return item


class NoCache(HostLRU):
    """An absent memory tier (a host cache of 0 bytes): holds nothing, counts nothing, reports nothing."""

    def __init__(self, name: str):
        super().__init__(name, 0)

    def lookup(self, key: str, current: Callable[[TaskRecord], bool]) -> ResidentPrefix | None:
        return None

    def loaded(self, seconds: float) -> None:
        pass

    def keepable(self, item: ResidentPrefix) -> ResidentPrefix:
        return item

    def admit(self, key: str, item: ResidentPrefix) -> None:
        pass

    def report(self, into: dict[str, CacheStats]) -> None:
        pass


class Residency:
    """The device and host LRUs, and what keeps a load finishing late out of them.

    ``generation`` is bumped by every invalidation, so a load that began before a write or delete is served
    but not admitted. ``announced`` is the newest version another replica announced: a load of an older
    one finishing late is not admitted, while a late event for the version just loaded (the usual race at
    start-up) leaves it resident."""

    def __init__(self, device: LRU, host: HostLRU):
        self.device = device
        self.host = host
        self._generation: dict[str, int] = {}
        self._announced: dict[str, int] = {}

    def generation(self, key: str) -> int:
        return self._generation.get(key, 0)

    def admissible(self, key: str, generation: int, record: TaskRecord) -> bool:
        """Whether a load begun at ``generation`` may stay resident: not replaced or deleted meanwhile."""
        return self.generation(key) == generation and record.version >= self._announced.get(key, 0)

    def invalidate(self, key: str) -> None:
        """Drop the task from both tiers; loads already under way are not admitted."""
        self.device.drop(key)
        self.host.drop(key)
        self._generation[key] = self.generation(key) + 1

    def supersede(self, key: str, version: int) -> None:
        """``version`` was written through from Redis: older resident copies are stale, this load is not."""
        self.device.drop_older(key, version)
        self.host.drop_older(key, version)

    def announce(self, op: str, key: str, version: int) -> None:
        """Another replica wrote ``version`` of ``key`` (``op``: "put" or "delete")."""
        if op == "delete":
            self.invalidate(key)
        else:
            self.supersede(key, version)
            self._announced[key] = max(self._announced.get(key, 0), version)
