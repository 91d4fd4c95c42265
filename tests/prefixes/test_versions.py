"""A (task, version) pair names one artifact forever: a delete does not reset a name's versions, on the
local disk alone, through Redis, and after Redis lost its data (the disk remembers each deleted name's
last version in deleted/)."""

from __future__ import annotations

import redis

from prefixes.store import PrefixStore
from tests.helpers.redis_server import RedisServer
from tests.prefixes.test_redis_store import on_disk, value, wait_until
from tests.prefixes.test_store import soft


def test_a_delete_does_not_reset_versions_on_disk(tmp_path):
    store = PrefixStore(tmp_path, 1 << 20, prepare=lambda t: t)
    assert [store.put("t", soft(value=v)).version for v in (1.0, 2.0)] == [1, 2]
    store.delete("t")
    third = store.put("t", soft(value=3.0))
    assert third.version == 3  # not 1 again: (t, 1) still names the first upload only
    store.delete("t")
    reopened = PrefixStore(tmp_path, 1 << 20, prepare=lambda t: t)  # remembered across a restart
    assert reopened.put("t", soft(value=4.0)).version == 4
    assert value(reopened, "t") == 4.0
    assert reopened.put("other", soft()).version == 1  # one sequence per name


def test_a_delete_does_not_reset_versions_after_redis_loses_its_data(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        stores = [PrefixStore(tmp_path / name, 1 << 20, prepare=lambda t: t, redis_url=server.url,
                              reconcile_interval=0.2) for name in ("a", "b")]
        a, b = stores
        try:
            for store in stores:
                assert store.redis.wait_subscribed(5)
            assert a.put("t", soft(value=1.0)).version == 1
            assert value(b, "t") == 1.0  # B holds a copy (written through to its disk)
            a.delete("t")  # tombstone v2 in Redis; B removes its copy on the event
            wait_until(lambda: on_disk(b, "t") is None, 2.0, "B saw the delete")
            r = redis.Redis.from_url(server.url)
            r.flushall()  # the tombstone and the sequence are gone from Redis
            r.close()
            again = b.put("t", soft(value=5.0))  # on B, which only saw the delete's event
            assert again.version == 3, again
            assert value(a, "t") == 5.0 and a.info("t").version == 3
        finally:
            for store in stores:
                store.close()


def test_a_delete_redis_lost_is_pushed_back_and_beats_a_stale_copy(tmp_path):
    """Redis flushed while a replica that never heard of a delete still holds the task: the deleting
    replica's remembered tombstone is pushed back, and it is newer than the stale copy."""
    import shutil

    with RedisServer(tmp_path / "redis") as server:
        opened: list[PrefixStore] = []

        def open_(name: str) -> PrefixStore:
            store = PrefixStore(tmp_path / name, 1 << 20, prepare=lambda t: t, redis_url=server.url,
                                reconcile_interval=0.2)
            opened.append(store)
            assert store.redis.wait_subscribed(5)
            return store

        try:
            a, b = open_("a"), open_("b")
            a.put("t", soft(value=1.0))
            assert value(b, "t") == 1.0
            b.close()
            shutil.copytree(tmp_path / "b", tmp_path / "stale")  # B's disk, from before the delete
            a.delete("t")
            r = redis.Redis.from_url(server.url)
            r.flushall()
            stale = open_("stale")  # pushes its v1 back (Redis lacks it); A pushes its tombstone
            wait_until(lambda: on_disk(stale, "t") is None, 5.0, "the stale copy removed")
            assert stale.list() == [] and a.list() == []
            state = r.hgetall("prefix-serve:task:t")
            assert state[b"deleted"] == b"1" and int(state[b"version"]) == 2, state
            r.close()
            assert stale.put("t", soft(value=7.0)).version == 3
        finally:
            for store in opened:
                store.close()
