"""Storage quotas hold under concurrent uploads: the check and the write are one step, in one process and
across replicas sharing one Redis (over HTTP: tests/api/test_tenants.py)."""

from __future__ import annotations

import pytest
import redis
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.store import PrefixStore, Quota, QuotaExceeded
from tests.helpers.redis_server import RedisServer
from tests.helpers.support import race

RACERS = 10
SOFT_BYTES = 4 * 64 * 4  # soft(): 4 float32 virtual tokens of width 64


def soft(seed: int) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    return PrefixArtifact(PrefixKind.P_TUNING, torch.randn(4, 64, generator=g), "peft")


@pytest.fixture
def replicas(tmp_path):
    """Two replicas, each with its own disk, sharing one real Redis."""
    with RedisServer(tmp_path / "redis") as redis:
        stores = [PrefixStore(tmp_path / name, 1 << 20, prepare=lambda t: t, redis_url=redis.url)
                  for name in ("a", "b")]
        try:
            for store in stores:
                assert store.redis is not None and store.redis.wait_subscribed(5)
            yield stores
        finally:
            for store in stores:
                store.close()


QUOTAS = {"max_tasks": Quota(max_tasks=3), "max_bytes": Quota(max_bytes=3 * SOFT_BYTES + SOFT_BYTES // 2)}


@pytest.mark.parametrize("limit", sorted(QUOTAS))
def test_replicas_racing_uploads_stay_within_the_quota(replicas, limit):
    quota = QUOTAS[limit]
    calls = [lambda i=i: replicas[i % 2].put(f"acme~t{i}", soft(i), quota=quota) for i in range(RACERS)]
    results = race(calls)
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(refused) == RACERS - 3, results
    for store in replicas:
        assert len(store.list("acme")) == 3
    # a replaced task's old bytes count out: rewriting a stored task fits; a fourth task still does not
    kept = replicas[0].list("acme")[0].key
    assert replicas[1].put(kept, soft(99), quota=quota).version == 2
    with pytest.raises(QuotaExceeded, match="delete one first" if limit == "max_tasks" else "quota of"):
        replicas[1].put("acme~another", soft(100), quota=quota)
    assert replicas[1].put("globex~t", soft(101), quota=quota).version == 1  # other namespaces are apart


def test_one_store_racing_uploads_stays_within_the_quota(tmp_path):
    store = PrefixStore(tmp_path, 1 << 20, prepare=lambda t: t)
    results = race([lambda i=i: store.put(f"acme~t{i}", soft(i), quota=Quota(max_tasks=3))
                    for i in range(RACERS)])
    assert sum(isinstance(r, QuotaExceeded) for r in results) == RACERS - 3, results
    assert len(store.list("acme")) == 3


def test_tasks_stored_before_the_quota_index_are_counted_once_a_replica_connects(tmp_path):
    """A release before quotas moved into Redis kept no per-namespace index. A replica that (re)connects adds
    the live tasks missing from it, so racing replicas count them too."""
    with RedisServer(tmp_path / "redis") as server:
        old = PrefixStore(tmp_path / "old", 1 << 20, prepare=lambda t: t, redis_url=server.url)
        assert old.redis is not None and old.redis.wait_subscribed(5)
        for i in range(3):
            old.put(f"acme~t{i}", soft(i))
        old.close()
        r = redis.Redis.from_url(server.url)
        r.delete("prefix-serve:owned:acme")  # what an earlier release left: tasks, but no index
        new = PrefixStore(tmp_path / "new", 1 << 20, prepare=lambda t: t, redis_url=server.url)
        try:
            assert new.redis is not None and new.redis.wait_subscribed(5)
            owned = {k.decode(): int(v) for k, v in r.hgetall("prefix-serve:owned:acme").items()}
            assert owned == {f"acme~t{i}": SOFT_BYTES for i in range(3)}
            with pytest.raises(QuotaExceeded, match="already has 3 tasks"):
                new.put("acme~t3", soft(3), quota=Quota(max_tasks=3))
        finally:
            new.close()
            r.close()
