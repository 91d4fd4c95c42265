"""Storage faults are clear errors, against the real server process on real file systems and a real Redis:
a full disk (a small tmpfs filled up: ENOSPC) and Redis out of memory (maxmemory, noeviction) are 507, a
read-only store (the tmpfs remounted ro) is 503, each in the JSON error shape saying what ran out; nothing
of the refused upload is kept anywhere, and earlier tasks stay listed, downloadable and served."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import redis
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from tests.helpers.mounts import Tmpfs
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import ServerProcess
from tests.helpers.support import save_tiny_llama

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

BODY = {"prompt": "hello", "max_new_tokens": 3}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("faults-model") / "model", tokenizer, max_positions=256)


def soft_prompt(seed: int) -> PrefixArtifact:
    """A soft prompt for support.save_tiny_llama's model (hidden size 64): about 1 KB of tensors."""
    g = torch.Generator().manual_seed(seed)
    return PrefixArtifact(PrefixKind.PROMPT_TUNING, torch.randn(4, 64, generator=g), "prefix-serve")


def upload(srv: ServerProcess, task: str, seed: int) -> httpx.Response:
    files = [("files", ("p.safetensors", to_own_format(soft_prompt(seed))))]
    return httpx.post(f"{srv.url}/prefixes/{task}", files=files, timeout=60)


class Served:
    """What the server answers for a task: its record, artifact digest and generated tokens."""

    def __init__(self, srv: ServerProcess, task: str):
        self.record = httpx.get(f"{srv.url}/prefixes/{task}").json()
        self.artifact = hashlib.sha256(httpx.get(f"{srv.url}/prefixes/{task}/artifact").content).hexdigest()
        self.tokens = httpx.post(f"{srv.url}/generate", params={"task": task}, json=BODY,
                                 timeout=60).json()["token_ids"]

    def __eq__(self, other) -> bool:
        return (self.record, self.artifact, self.tokens) == (other.record, other.artifact, other.tokens)


def assert_refused(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, detail
    assert "retry-after" not in r.headers  # retrying soon cannot help: room must be made first


def test_a_full_disk_is_507_and_keeps_earlier_tasks(tmp_path, tiny_model_dir):
    with Tmpfs(tmp_path / "store", size=1 << 20) as disk, RedisServer(tmp_path / "redis") as rs, \
            ServerProcess(disk.path, tmp_path / "server.log", model=str(tiny_model_dir),
                          extra_args=("--redis-url", rs.url)) as srv:
        assert upload(srv, "early", 1).status_code == 201
        assert upload(srv, "spare", 2).status_code == 201
        before = Served(srv, "early")
        r = redis.Redis.from_url(rs.url)

        # Full but one page: the tensor file fits, its record does not (after Redis numbered the version,
        # before it may publish it). Then full to the last byte: the tensor file itself fails.
        for leave in (4096, 0):
            disk.empty()
            disk.fill(leave=leave)
            for task, seed in (("early", 3), ("late", 4)):  # a new version of a task, and a new task
                numbered = r.get(f"prefix-serve:seq:{task}")
                assert_refused(upload(srv, task, seed), 507, "disk) is full", repr(task),
                               "nothing of it was kept", "earlier tasks are intact")
                # one page left: refused after Redis handed out a number (skipped, never reused); none
                # left: refused while staging, before Redis was asked
                assert (r.get(f"prefix-serve:seq:{task}") != numbered) == (leave > 0)
            assert list((disk.path / "tmp").iterdir()) == []  # nothing half-written left behind
            assert not (disk.path / "tasks" / "late").exists()
            assert r.hget("prefix-serve:task:early", "version") == b"1"  # Redis never saw the refused ones
            assert not r.exists("prefix-serve:task:late")
            assert Served(srv, "early") == before
            names = [p["task"] for p in httpx.get(f"{srv.url}/prefixes").json()["prefixes"]]
            assert names == ["early", "spare"]

        # a delete works on a full disk (it frees space), and the name's versions still never restart
        assert httpx.delete(f"{srv.url}/prefixes/spare").status_code == 204
        disk.empty()
        assert upload(srv, "late", 4).status_code == 201
        assert upload(srv, "spare", 5).json()["version"] > 2
        assert upload(srv, "early", 3).json()["version"] >= 2
        r.close()
    assert "Traceback" not in srv.log_text(), srv.log_tail()


def test_a_read_only_store_is_503_and_keeps_serving(tmp_path, tiny_model_dir):
    with Tmpfs(tmp_path / "store", size=8 << 20) as disk, RedisServer(tmp_path / "redis") as rs, \
            ServerProcess(disk.path, tmp_path / "server.log", model=str(tiny_model_dir),
                          extra_args=("--redis-url", rs.url)) as srv:
        assert upload(srv, "early", 1).status_code == 201
        before = Served(srv, "early")
        disk.read_only()  # e.g. the volume remounted ro after an I/O error
        try:
            assert_refused(upload(srv, "early", 2), 503, "read-only", "'early'")
            assert_refused(upload(srv, "late", 3), 503, "read-only", "'late'")
            assert_refused(httpx.delete(f"{srv.url}/prefixes/early"), 503, "read-only", "'early'")
            assert Served(srv, "early") == before  # the refused delete did not reach Redis either
            r = redis.Redis.from_url(rs.url)
            assert r.hget("prefix-serve:task:early", "version") == b"1"
            assert not r.exists("prefix-serve:task:late")
            r.close()
        finally:
            disk.writable()
        assert upload(srv, "late", 3).status_code == 201
    assert "Traceback" not in srv.log_text(), srv.log_tail()


def test_redis_out_of_memory_is_507_and_nothing_is_half_written(tmp_path, tiny_model_dir):
    with RedisServer(tmp_path / "redis", extra_args=("--maxmemory", "64mb", "--maxmemory-policy",
                                                     "noeviction")) as rs, \
            ServerProcess(tmp_path / "store", tmp_path / "server.log", model=str(tiny_model_dir),
                          extra_args=("--redis-url", rs.url)) as srv:
        assert upload(srv, "early", 1).status_code == 201
        assert upload(srv, "spare", 2).status_code == 201
        before = Served(srv, "early")
        r = redis.Redis.from_url(rs.url)
        for key in range(256):  # other data fills Redis up: 1 MB of it, then maxmemory set below its use
            r.set(f"other:{key}", b"x" * 4096)
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - (512 << 10))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("one-more", b"x")
        for task, seed in (("early", 3), ("late", 4)):
            assert_refused(upload(srv, task, seed), 507, "Redis", "out of memory", repr(task),
                           "nothing of it was kept")
        assert not (tmp_path / "store" / "tasks" / "late").exists()
        assert list((tmp_path / "store" / "pending").iterdir()) == []  # not taken as an outage write
        assert r.hget("prefix-serve:task:early", "version") == b"1"
        assert Served(srv, "early") == before
        # Redis is up, so a task this replica never held is still found (no outage breaker opened)
        assert [p["task"] for p in httpx.get(f"{srv.url}/prefixes").json()["prefixes"]] == ["early", "spare"]
        assert httpx.delete(f"{srv.url}/prefixes/spare").status_code == 204  # deletes free memory: allowed
        assert not r.sismember("prefix-serve:tasks", "spare")
        r.config_set("maxmemory", 64 << 20)  # the operator makes room
        assert upload(srv, "late", 4).status_code == 201
        assert Served(srv, "early") == before
        r.close()
    assert "Traceback" not in srv.log_text(), srv.log_tail()


def test_a_read_only_redis_refuses_writes_and_keeps_reads(tmp_path):
    """A Redis that became a read-only replica (e.g. the address now points at one after a failover):
    uploads and deletes are StoreReadOnly (503), nothing is recorded as an outage write, reads go on."""
    from prefixes.store import PrefixStore, StoreReadOnly
    from tests.helpers.server_process import free_port
    from tests.prefixes.test_store import soft

    with RedisServer(tmp_path / "redis") as rs:
        store = PrefixStore(tmp_path / "a", 1 << 20, prepare=lambda t: t, redis_url=rs.url)
        try:
            assert store.redis.wait_subscribed(5)
            early = store.put("early", soft(value=1.0))
            r = redis.Redis.from_url(rs.url)
            r.replicaof("127.0.0.1", free_port())  # a replica of a master that is gone: read-only, stale
            with pytest.raises(StoreReadOnly, match="read-only"):
                store.put("late", soft(value=2.0))
            with pytest.raises(StoreReadOnly, match="read-only"):
                store.delete("early")
            assert list((tmp_path / "a" / "pending").iterdir()) == []
            assert not (tmp_path / "a" / "tasks" / "late").exists()
            assert store.list() == [early] and store.get("early").record == early
            r.replicaof("NO", "ONE")
            assert store.put("late", soft(value=2.0)).version == 1
            r.close()
        finally:
            store.close()
