"""The task store, a package of tiers with one job each (see :mod:`prefixes.store.store`).

Task names, store keys and records live outside it (:mod:`prefixes.keys`, :mod:`prefixes.records`), so
that the engine and the HTTP layer's auth use them without importing the store or Redis.
"""

from prefixes.store.errors import (
    Quota,
    QuotaExceeded,
    StorageFull,
    StoreReadOnly,
    StoreUnavailable,
    TaskNotFound,
)
from prefixes.store.memory import CacheStats
from prefixes.store.store import PrefixStore

__all__ = ["CacheStats", "PrefixStore", "Quota", "QuotaExceeded", "StorageFull", "StoreReadOnly",
           "StoreUnavailable", "TaskNotFound"]
