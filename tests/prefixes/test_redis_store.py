"""The shared Redis tier of PrefixStore, against real redis-server processes (tests/helpers/redis_server.py).

Store-level tests run several PrefixStore "replicas" in this process, each on its own --store-dir, sharing
one real Redis; outages are real (the server killed and restarted empty, or frozen with SIGSTOP, or one
replica cut off by a TCP proxy). The last test runs two real server processes against one Redis.

Run: PREFIX_SERVE_CACHE=/tmp/pscache .venv/bin/python -m pytest -q tests/prefixes/test_redis_store.py
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import from_own_format, to_own_format
from prefixes.store import PrefixStore, StoreUnavailable, TaskNotFound
from server.config import Settings
from tests.helpers.redis_server import RedisServer, TcpProxy
from tests.helpers.server_process import ServerProcess
from tests.prefixes.test_store import ROW_BYTES, deep, soft

TASK_BYTES = 4 * ROW_BYTES  # soft(4): one task


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` holds; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.005)
    return time.monotonic() - start


def value(store: PrefixStore, task: str) -> float:
    return store.get(task).tensor.flatten()[0].item()


def on_disk(store: PrefixStore, task: str) -> int | None:
    """The version the store's own disk serves (None: not there)."""
    try:
        return int((store.root / "tasks" / task / "CURRENT").read_text())
    except FileNotFoundError:
        return None


@pytest.fixture
def redis_server(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def open_store(tmp_path, redis_server):
    """open_store(name, url=None, **kwargs): a replica on its own folder, subscribed to the shared Redis."""
    opened: list[PrefixStore] = []

    def open_(name: str, url: str | None = None, cache_bytes: int = 1 << 20, **kwargs) -> PrefixStore:
        store = PrefixStore(tmp_path / name, cache_bytes, prepare=lambda t: t,
                            redis_url=url or redis_server.url, **kwargs)
        opened.append(store)
        assert store.redis.wait_subscribed(5), "the Redis listener did not subscribe"
        return store

    yield open_
    for store in opened:
        store.close()


# ---------------------------------------------------------------------------------------------------------
# Sharing across replicas


def test_task_put_on_one_replica_is_served_by_another_with_its_own_disk(open_store, redis_server):
    a, b = open_store("a"), open_store("b")
    artifact = deep(p=3, seed=1)
    record = a.put("acme~summary", artifact)
    assert record.version == 1

    resident = b.get("acme~summary")
    assert resident.record == record
    assert resident.kind is PrefixKind.PREFIX_TUNING
    assert torch.equal(resident.tensor, artifact.tensor)
    assert b.info("acme~summary") == record
    assert b.list() == [record] and b.list("acme") == [record] and b.list("other") == []
    assert b.read_artifact("acme~summary") == a.read_artifact("acme~summary")
    # written through to B's own disk, so B can serve it through a Redis outage
    assert on_disk(b, "acme~summary") == 1

    # what Redis holds: the store's own safetensors format, plus sha256, version and owner
    r = redis.Redis.from_url(redis_server.url)
    held = r.hgetall("prefix-serve:task:acme~summary")
    assert held[b"version"] == b"1" and held[b"owner"] == b"acme"
    assert held[b"sha256"].decode() == artifact.sha256()
    stored = from_own_format(held[b"data"])
    assert (stored.kind, stored.source_format) == (artifact.kind, "chatglm")
    assert stored.metadata == artifact.metadata
    assert torch.equal(stored.tensor, artifact.tensor)
    r.close()


def test_list_shows_tasks_uploaded_on_other_replicas(open_store):
    a, b = open_store("a"), open_store("b")
    x = a.put("acme~x", soft(seed=1))
    b.put("beta~y", soft(seed=2))
    b.put("plain", soft(seed=3))
    for store in (a, b):
        assert [r.key for r in store.list()] == ["acme~x", "beta~y", "plain"]
        assert store.list("acme") == [x]
        assert [r.key for r in store.list("beta")] == ["beta~y"]


def test_update_reaches_other_replica_through_pubsub_within_a_second(open_store):
    a, b = open_store("a"), open_store("b")
    a.put("t", soft(value=1.0))
    assert value(b, "t") == 1.0
    assert b.stats.resident_tasks == 1

    a.put("t", soft(value=2.0))
    # B drops its resident copy by itself (no request needed) and refreshes its disk copy in the background
    assert wait_until(lambda: b.stats.resident_tasks == 0, 1.0, "B invalidated by the event") < 1.0
    wait_until(lambda: on_disk(b, "t") == 2, 1.0, "B's disk copy refreshed")
    assert value(b, "t") == 2.0
    assert b.get("t").record.version == 2
    assert b.redis.events >= 1


def test_a_late_event_only_keeps_out_a_load_it_supersedes(open_store):
    """The event for a put can reach a replica after that replica already began loading the version it
    announces (CI saw this once: the first load was then never admitted). Such a late event must leave the
    load resident; an event for a newer version must still keep the older load out of memory."""
    a, b = open_store("a"), open_store("b")
    a.put("t", soft(value=1.0))
    b.redis.stop_listener()  # the events below are delivered by hand, in the middle of a load
    load = b._load

    def load_then_event(version: int):
        def wrapped(*args):
            loaded = load(*args)
            b.sync.on_event("put", "t", version)
            return loaded
        return wrapped

    b._load = load_then_event(1)
    assert value(b, "t") == 1.0
    assert b.stats.resident_tasks == 1  # the late event for version 1 did not evict what it announced

    b.residency.device.drop("t")
    b._load = load_then_event(2)  # version 2 is announced while version 1 is being loaded
    assert value(b, "t") == 1.0
    assert b.stats.resident_tasks == 0


def test_missed_event_cannot_serve_a_stale_version(open_store):
    a, b = open_store("a"), open_store("b")
    a.put("t", soft(value=1.0))
    assert value(b, "t") == 1.0
    b.redis.stop_listener()  # B now misses every event

    a.put("t", soft(value=2.0))
    time.sleep(0.2)
    assert b.stats.resident_tasks == 1  # the event was not seen: the stale copy is still in memory...
    assert value(b, "t") == 2.0  # ...but the version check on get refuses it
    assert b.info("t").version == 2
    hits = b.stats.hits
    assert value(b, "t") == 2.0 and b.stats.hits == hits + 1  # and the new copy is then a plain hit

    a.delete("t")
    with pytest.raises(TaskNotFound):
        b.get("t")
    assert on_disk(b, "t") is None


def test_listener_resubscribes_after_its_connection_is_killed(open_store, redis_server):
    a, b = open_store("a"), open_store("b")
    a.put("t", soft(value=1.0))
    assert value(b, "t") == 1.0
    connects = b.redis.connects

    r = redis.Redis.from_url(redis_server.url)
    assert r.client_kill_filter(_type="pubsub") >= 2  # both replicas' subscriptions
    r.close()
    a.put("t", soft(value=2.0))  # possibly while B is not subscribed
    assert value(b, "t") == 2.0  # served correctly either way (version check)

    wait_until(lambda: b.redis.connects > connects, 5.0, "B resubscribed")
    a.put("t", soft(value=3.0))
    wait_until(lambda: b.stats.resident_tasks == 0, 1.0, "events reach B again")
    assert value(b, "t") == 3.0


def test_delete_propagates_and_a_stale_local_copy_never_resurrects(open_store, tmp_path):
    a, b = open_store("a"), open_store("b")
    a.put("t", soft(value=1.0))
    assert value(b, "t") == 1.0
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # a replica's disk holding the task, offline for now
    b.redis.stop_listener()  # B misses the delete event

    a.delete("t")
    assert on_disk(b, "t") == 1  # B never heard of the delete...
    with pytest.raises(TaskNotFound):
        b.info("t")  # ...but Redis's tombstone wins over its local copy
    assert b.list() == []
    with pytest.raises(TaskNotFound):
        b.get("t")
    assert on_disk(b, "t") is None  # and the leftover is removed
    with pytest.raises(TaskNotFound):
        b.delete("t")

    c = open_store("c")  # starts over a disk that still has the deleted task: reconciled away
    assert c.list() == []
    assert on_disk(c, "t") is None

    record = a.put("t", soft(value=5.0))  # the name can be reused; the version is above the tombstone's
    assert record.version > 1
    assert value(b, "t") == 5.0 and value(c, "t") == 5.0


def test_versions_are_allocated_atomically_across_replicas(open_store):
    a, b = open_store("a"), open_store("b")
    records, errors = [], []

    def upload(store: PrefixStore, offset: int) -> None:
        try:
            for i in range(10):
                records.append(store.put("t", soft(value=offset + i)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(s, 100 * k)) for k, s in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(r.version for r in records) == list(range(1, 21))  # no number handed out twice
    last = max(records, key=lambda r: r.version)
    for store in (a, b):
        assert store.info("t") == last
        assert store.get("t").record == last  # both serve the last version allocated
    assert a.put("other", soft()).version == 1  # one sequence per task
    a.delete("t")
    assert b.put("t", soft()).version == 22  # the tombstone took 21


# ---------------------------------------------------------------------------------------------------------
# Redis going away


def test_redis_outage_keeps_serving_and_writes_are_pushed_when_it_returns(open_store, redis_server):
    a = open_store("a")
    b = open_store("b", cache_bytes=TASK_BYTES)  # B's memory holds one task
    for task, v in (("hot", 1.0), ("cold", 2.0), ("only-a", 3.0)):
        a.put(task, soft(value=v))
    assert value(b, "cold") == 2.0
    hot = b.get("hot")  # evicts "cold" from B's memory; it stays on B's disk
    assert b.stats.evictions == 1

    redis_server.stop()  # killed; it comes back empty (no persistence)
    start = time.monotonic()
    assert b.get("hot") is hot  # resident: served as is
    disk_hits = b.disk_stats.hits
    assert value(b, "cold") == 2.0  # cold: from B's own disk
    assert b.disk_stats.hits == disk_hits + 1
    with pytest.raises(StoreUnavailable):
        b.get("only-a")  # never reached B's disk: B cannot even tell it exists until Redis is back
    new = b.put("new", soft(value=4.0))  # uploads land on the local disk
    assert value(b, "new") == 4.0
    b.delete("cold")
    with pytest.raises(TaskNotFound):
        b.get("cold")
    assert [r.key for r in b.list()] == ["hot", "new"]
    a.put("hot", soft(value=5.0))  # A too keeps taking uploads
    assert value(a, "hot") == 5.0
    assert time.monotonic() - start < 3.0, "a dead Redis stalled the store"
    assert (b.root / "pending" / "new.json").exists()

    redis_server.start()  # empty: both replicas push back what they have, and what they did meanwhile
    expected = {"hot", "new", "only-a"}  # "cold" stays deleted: B's tombstone beats A's older copy
    for store in (a, b):
        wait_until(lambda s=store: {r.key for r in s.list()} == expected, 10.0,
                   f"{store.root.name} reconciled")
    wait_until(lambda: value(b, "hot") == 5.0, 5.0, "A's outage upload of 'hot' reached B")
    assert value(a, "new") == 4.0 and a.info("new").sha256 == new.sha256
    assert value(b, "only-a") == 3.0
    assert not (b.root / "pending" / "new.json").exists()
    assert on_disk(a, "cold") is None

    # propagation works again
    assert b.redis.wait_subscribed(5)
    b.get("hot")
    a.put("hot", soft(value=6.0))
    wait_until(lambda: b.stats.resident_tasks == 0 or b.get("hot").record.version == a.info("hot").version,
               1.0, "B saw the update")
    assert value(b, "hot") == 6.0


def test_upload_during_outage_survives_a_replica_restart(open_store, redis_server, tmp_path):
    b = open_store("b")
    redis_server.stop()
    b.put("t", soft(value=7.0))
    b.close()  # the replica restarts before Redis is back

    redis_server.start()
    b2 = open_store("b")  # same folder: its pending upload is pushed on (re)connection
    a = open_store("a")
    wait_until(lambda: a.list() != [], 5.0, "the upload reached Redis")
    assert value(a, "t") == 7.0
    assert list((tmp_path / "b" / "pending").iterdir()) == []
    assert b2.info("t") == a.info("t")


def test_hung_redis_costs_a_request_at_most_a_short_timeout(open_store, redis_server):
    a, b = open_store("a"), open_store("b")
    a.put("t", soft(value=1.0))
    assert value(b, "t") == 1.0

    redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
    worst = 0.0
    for _ in range(20):
        start = time.monotonic()
        assert value(b, "t") == 1.0
        worst = max(worst, time.monotonic() - start)
    assert worst < 0.6
    b.put("u", soft(value=2.0))  # recorded, pushed once Redis answers again
    redis_server.resume()
    wait_until(lambda: [r.key for r in a.list()] == ["t", "u"], 10.0, "B's upload pushed after the pause")
    assert value(a, "u") == 2.0


def test_partitioned_replica_last_writer_wins(open_store, redis_server):
    proxy = TcpProxy.to(redis_server)  # B reaches Redis only through the proxy; A directly
    try:
        a, b = open_store("a"), open_store("b", url=proxy.url)
        a.put("t", soft(value=1.0))
        assert value(b, "t") == 1.0

        # B's write during the partition is older than A's: A's wins everywhere once B is back.
        proxy.cut()
        b.put("t", soft(value=2.0))
        assert value(b, "t") == 2.0  # B serves its own write meanwhile
        time.sleep(0.01)
        a.put("t", soft(value=3.0))
        connects = b.redis.connects
        proxy.heal()
        wait_until(lambda: b.redis.connects > connects, 10.0, "B reconnected")
        assert value(b, "t") == 3.0 and value(a, "t") == 3.0
        assert on_disk(b, "t") == a.info("t").version

        # B's write during the partition is the later one: it wins, with a version above A's.
        proxy.cut()
        a4 = a.put("t", soft(value=4.0))
        time.sleep(0.01)
        b.put("t", soft(value=5.0))
        connects = b.redis.connects
        proxy.heal()
        wait_until(lambda: b.redis.connects > connects, 10.0, "B reconnected")
        wait_until(lambda: value(a, "t") == 5.0, 2.0, "B's later write reached A")
        assert value(b, "t") == 5.0
        assert a.info("t").version > a4.version
    finally:
        proxy.close()


# ---------------------------------------------------------------------------------------------------------
# Metrics per tier


def test_tier_stats_per_tier(open_store, redis_server, tmp_path):
    a = open_store("a")
    # host tier on a CPU store, for the test: room for one task on the "device", two in host memory
    b = open_store("b", cache_bytes=TASK_BYTES, host_cache_bytes=2 * TASK_BYTES)
    a.put("x", soft(value=1.0))
    a.put("y", soft(value=2.0))

    def counts(store):
        return {tier: (s.hits, s.misses, s.evictions) for tier, s in store.tier_stats().items()}

    assert set(b.tier_stats()) == {"memory", "host", "redis", "disk"}
    assert counts(b) == {"memory": (0, 0, 0), "host": (0, 0, 0), "redis": (0, 0, 0), "disk": (0, 0, 0)}
    value(b, "x")  # new to B: from Redis (B's disk does not have it yet)
    assert counts(b) == {"memory": (0, 1, 0), "host": (0, 1, 0), "redis": (1, 0, 0), "disk": (0, 1, 0)}
    value(b, "x")
    assert counts(b)["memory"] == (1, 1, 0)
    value(b, "y")  # evicts x from device memory; host memory keeps both
    assert counts(b) == {"memory": (1, 2, 1), "host": (0, 2, 0), "redis": (2, 0, 0), "disk": (0, 2, 0)}
    assert value(b, "x") == 1.0  # back from host memory, without Redis or disk
    assert counts(b) == {"memory": (1, 3, 2), "host": (1, 2, 0), "redis": (2, 0, 0), "disk": (0, 2, 0)}

    stats = b.tier_stats()
    assert (stats["memory"].resident_bytes, stats["memory"].resident_tasks) == (TASK_BYTES, 1)
    assert (stats["host"].resident_bytes, stats["host"].resident_tasks) == (2 * TASK_BYTES, 2)
    assert (stats["redis"].resident_bytes, stats["redis"].resident_tasks) == (2 * TASK_BYTES, 2)
    assert (stats["disk"].resident_bytes, stats["disk"].resident_tasks) == (2 * TASK_BYTES, 2)
    for tier in ("memory", "host", "redis"):
        assert stats[tier].load_seconds_total > 0, tier

    a.put("y", soft(value=3.0))  # host memory's copy of y is now stale: never served
    wait_until(lambda: b.host_stats.resident_tasks == 1, 1.0, "B's host copy invalidated")
    wait_until(lambda: on_disk(b, "y") == 2, 1.0, "B's disk copy refreshed in the background")
    assert value(b, "y") == 3.0  # the current version, from B's own disk: Redis only said which one
    assert counts(b) == {"memory": (1, 4, 3), "host": (1, 3, 0), "redis": (2, 0, 0), "disk": (1, 2, 0)}
    with b.lock:
        b.residency.invalidate("x")  # x leaves B's memory tiers (host memory too): next load from B's disk
    assert value(b, "x") == 1.0
    assert counts(b)["disk"] == (2, 2, 0) and counts(b)["redis"] == (2, 0, 0)

    # a replica starting while Redis is down: cold loads come from its disk
    b.close()
    redis_server.stop()
    c = PrefixStore(tmp_path / "b", TASK_BYTES, prepare=lambda t: t, redis_url=redis_server.url)
    try:
        assert value(c, "x") == 1.0
        assert counts(c) == {"memory": (0, 1, 0), "redis": (0, 1, 0), "disk": (1, 0, 0)}
        assert c.tier_stats()["disk"].load_seconds_total > 0
    finally:
        c.close()


def test_store_without_redis_reports_memory_and_disk_tiers(tmp_path):
    store = PrefixStore(tmp_path, 1 << 20, prepare=lambda t: t)
    store.put("t", soft())
    store.get("t")
    store.get("t")
    stats = store.tier_stats()
    assert set(stats) == {"memory", "disk"}
    assert (stats["memory"].hits, stats["memory"].misses) == (1, 1)
    assert (stats["disk"].hits, stats["disk"].resident_tasks) == (1, 1)
    assert stats["disk"].resident_bytes == TASK_BYTES
    assert store.redis is None and not (tmp_path / "pending").exists()


def test_settings_and_cli_take_the_redis_options():
    from server.cli import build_parser

    with pytest.raises(ValueError, match="--redis-url 'localhost:6379': use redis://"):
        Settings(redis_url="localhost:6379")
    with pytest.raises(ValueError, match="host_cache_bytes"):
        Settings(host_cache_bytes=-1)
    with pytest.raises(ValueError, match="--redis-reconcile-interval"):
        Settings(redis_reconcile_interval=0)
    args = build_parser().parse_args(["serve", "--redis-url", "redis://127.0.0.1:1/0",
                                      "--host-cache-bytes", "5", "--redis-reconcile-interval", "0.5"])
    assert (args.redis_url, args.host_cache_bytes) == ("redis://127.0.0.1:1/0", 5)
    assert args.redis_reconcile_interval == 0.5
    defaults = build_parser().parse_args(["serve"])
    assert defaults.redis_url is None and defaults.redis_reconcile_interval == 5.0


# ---------------------------------------------------------------------------------------------------------
# Two real servers, one Redis


PROMPT = "The capital of France is"


def _soft_prompt_file(seed: int) -> bytes:
    torch.manual_seed(seed)
    tensor = torch.randn(8, 576) * 5.0  # SmolLM2-135M hidden size; scaled so that it changes greedy output
    return to_own_format(PrefixArtifact(PrefixKind.PROMPT_TUNING, tensor, "prefix-serve"))


def _generate(client: httpx.Client, url: str, task: str) -> httpx.Response:
    return client.post(f"{url}/generate", params={"task": task},
                       json={"prompt": PROMPT, "max_new_tokens": 8})


@pytest.mark.long  # two real servers on one Redis: minutes (make test-long)
@pytest.mark.slow
def test_two_servers_share_tasks_through_redis(tmp_path, redis_server):
    from server.engine.model import default_model_dir

    default_model_dir()  # converted once, before the servers start
    args = ("--redis-url", redis_server.url, "--threads", "1")
    servers = [ServerProcess(tmp_path / name / "store", tmp_path / f"{name}.log", extra_args=args,
                             startup_timeout=300) for name in ("a", "b")]
    with servers[0] as a, servers[1] as b, httpx.Client(timeout=120) as client:
        def upload(seed: int) -> dict:
            files = [("files", ("t.safetensors", _soft_prompt_file(seed)))]
            r = client.post(f"{a.url}/prefixes/t", files=files)
            assert r.status_code == 201, r.text
            return r.json()

        v1 = upload(1)
        assert client.get(f"{b.url}/prefixes/t").json() == v1
        out_a = _generate(client, a.url, "t").json()["token_ids"]
        out_b = _generate(client, b.url, "t").json()["token_ids"]
        assert out_b == out_a
        assert (tmp_path / "b" / "store" / "tasks" / "t" / "CURRENT").read_text() == "1"  # B's own disk copy

        v2 = upload(2)
        assert v2["version"] == 2
        start = time.monotonic()
        while client.get(f"{b.url}/prefixes/t").json()["version"] != 2:
            assert time.monotonic() - start < 1.5, "B did not see the new version"
            time.sleep(0.02)
        new_a = _generate(client, a.url, "t").json()["token_ids"]
        assert new_a != out_a, "the two uploads should generate differently"
        assert _generate(client, b.url, "t").json()["token_ids"] == new_a

        assert client.delete(f"{a.url}/prefixes/t").status_code == 204
        start = time.monotonic()
        while (r := _generate(client, b.url, "t")).status_code != 404:
            assert r.status_code == 200, r.text
            assert time.monotonic() - start < 1.5, "B still serves the deleted task"
            time.sleep(0.02)
        assert client.get(f"{b.url}/prefixes").json()["prefixes"] == []

        text = client.get(f"{b.url}/metrics").text
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert metrics[("prefix_serve_prefix_cache_hits_total", (("tier", "redis"),))] >= 1
        assert ("prefix_serve_prefix_cache_resident_bytes", (("tier", "disk"),)) in metrics

        # Redis dies: B keeps serving what it has and keeps taking uploads, which reach A once Redis is back.
        upload(3)
        served = _generate(client, b.url, "t").json()["token_ids"]
        redis_server.stop()
        assert _generate(client, b.url, "t").json()["token_ids"] == served
        r = client.post(f"{b.url}/prefixes/w", files=[("files", ("w.safetensors", _soft_prompt_file(4)))])
        assert r.status_code == 201, r.text
        w_on_b = _generate(client, b.url, "w").json()["token_ids"]
        redis_server.start()  # empty: the replicas push their tasks back
        start = time.monotonic()
        while (r := _generate(client, a.url, "w")).status_code != 200:
            assert r.status_code in (404, 503), r.text  # not pushed yet, or A not yet reconnected
            assert time.monotonic() - start < 10, "B's outage upload did not reach A"
            time.sleep(0.05)
        assert r.json()["token_ids"] == w_on_b
        assert _generate(client, b.url, "t").json()["token_ids"] == served
    for server in servers:
        assert "Traceback" not in server.log_text(), server.log_tail()
