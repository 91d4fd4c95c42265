"""Replicas converge after Redis loses data without dropping their connections (FLUSHALL, a failover to an
empty server behind the same address, eviction): each replica's periodic reconcile
(--redis-reconcile-interval) pushes back what it holds, and the newest version wins. Real redis-server;
the last test runs two real server processes under load."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import httpx
import pytest
import redis
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from prefixes.store import PrefixStore
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import ServerProcess
from tests.helpers.support import save_tiny_llama
from tests.prefixes.test_redis_store import value, wait_until
from tests.prefixes.test_store import soft

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

CONVERGENCE_BOUND_S = 30.0  # what the README states; the test servers reconcile every second


@pytest.fixture
def replicas(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        stores = [PrefixStore(tmp_path / name, 1 << 20, prepare=lambda t: t, redis_url=server.url,
                              reconcile_interval=0.2) for name in ("a", "b")]
        try:
            for store in stores:
                assert store.redis.wait_subscribed(5)
            yield server, stores
        finally:
            for store in stores:
                store.close()


def listing(store: PrefixStore) -> dict[str, tuple[int, str]]:
    return {r.key: (r.version, r.sha256) for r in store.list()}


def test_flushall_is_noticed_and_both_replicas_push_back_what_they_hold(replicas):
    server, (a, b) = replicas
    a.put("on-a", soft(value=1.0))
    b.put("on-b", soft(value=2.0))
    a.put("both", soft(value=3.0))
    b.put("both", soft(value=4.0))  # v2, the newest: A's disk may still hold v1 for a moment
    wait_until(lambda: listing(a) == listing(b) and len(listing(a)) == 3, 2.0, "both see all three")
    r = redis.Redis.from_url(server.url)
    r.flushall()
    # straight after the flush each replica only knows its own disk...
    assert "on-b" not in listing(a) and "on-a" not in listing(b)
    took = wait_until(lambda: listing(a) == listing(b) and len(listing(a)) == 3, 5.0, "converged")
    assert took < 5.0
    assert listing(a)["both"][0] == 2
    for store in (a, b):
        assert (value(store, "on-a"), value(store, "on-b"), value(store, "both")) == (1.0, 2.0, 4.0)
    assert a.put("both", soft(value=5.0)).version == 3  # the sequence was pushed back too
    r.close()


def test_an_evicted_task_is_pushed_back(replicas):
    server, (a, b) = replicas
    a.put("t", soft(value=1.0))
    assert value(b, "t") == 1.0
    r = redis.Redis.from_url(server.url)
    r.delete("prefix-serve:task:t")  # what an eviction policy does to one key
    wait_until(lambda: r.hget("prefix-serve:task:t", "version") == b"1", 5.0, "pushed back")
    assert value(a, "t") == 1.0 and value(b, "t") == 1.0
    r.close()


# ---------------------------------------------------------------------------------------------------------
# Two real servers on one Redis, FLUSHALL under load


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("convergence-model") / "model"
    return save_tiny_llama(folder, tokenizer, max_positions=256)


def soft_prompt(seed: int) -> PrefixArtifact:
    """A soft prompt for support.save_tiny_llama's model (hidden size 64)."""
    g = torch.Generator().manual_seed(seed)
    return PrefixArtifact(PrefixKind.PROMPT_TUNING, torch.randn(4, 64, generator=g), "prefix-serve")


def test_two_servers_converge_after_flushall_under_load(tmp_path, tiny_model_dir):
    with RedisServer(tmp_path / "redis") as server:
        args = ("--redis-url", server.url, "--redis-reconcile-interval", "1", "--threads", "1")
        procs = [ServerProcess(tmp_path / name / "store", tmp_path / f"{name}.log", model=str(tiny_model_dir),
                               extra_args=args) for name in ("a", "b")]
        with procs[0] as a, procs[1] as b, httpx.Client(timeout=60) as client:
            uploaded: dict[str, str] = {}  # task -> sha256 of its tensors, as the uploader computed it
            lock = threading.Lock()

            def upload(srv: ServerProcess, task: str, seed: int) -> int:
                artifact = soft_prompt(seed)
                files = [("files", ("p.safetensors", to_own_format(artifact)))]
                r = client.post(f"{srv.url}/prefixes/{task}", files=files)
                if r.status_code == 201:
                    with lock:
                        uploaded[task] = artifact.sha256()
                return r.status_code

            for i in range(8):  # half on each replica; none loaded by the other yet
                assert upload((a, b)[i % 2], f"task-{i}", i) == 201

            def listed(srv: ServerProcess) -> dict[str, tuple[int, str]]:
                body = client.get(f"{srv.url}/prefixes").json()
                return {p["task"]: (p["version"], p["sha256"]) for p in body["prefixes"]}

            wait_until(lambda: listed(a).keys() == listed(b).keys() == set(uploaded), 5.0, "both list all")

            stop = threading.Event()
            statuses: list[int] = []
            errors: list[BaseException] = []

            def generate_load() -> None:
                rng = random.Random(0)
                try:
                    with httpx.Client(timeout=60) as own:
                        while not stop.is_set():
                            srv, task = rng.choice((a, b)), rng.choice(sorted(uploaded))
                            r = own.post(f"{srv.url}/generate", params={"task": task},
                                         json={"prompt": "hello", "max_new_tokens": 2})
                            statuses.append(r.status_code)
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    errors.append(exc)

            def upload_load() -> None:
                try:
                    for i in range(8, 14):  # new tasks, uploaded while Redis loses everything
                        upload((a, b)[i % 2], f"task-{i}", i)
                        time.sleep(0.3)
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    errors.append(exc)

            workers = [threading.Thread(target=generate_load) for _ in range(2)]
            uploader = threading.Thread(target=upload_load)
            for worker in workers:
                worker.start()
            time.sleep(1.0)
            uploader.start()
            r = redis.Redis.from_url(server.url)
            r.flushall()
            flushed = time.monotonic()
            uploader.join()
            # converged: both replicas list the same tasks, each at the same version and digest, and these
            # are every task uploaded with its uploader's digest
            expected = set(uploaded)
            while not (listed(a) == listed(b) and set(listed(a)) == expected):
                assert time.monotonic() - flushed < CONVERGENCE_BOUND_S, (listed(a), listed(b), expected)
                time.sleep(0.2)
            took = time.monotonic() - flushed
            stop.set()
            for worker in workers:
                worker.join()
            r.close()
            assert not errors, errors
            assert set(statuses) <= {200, 404, 503}, set(statuses)
            assert took < CONVERGENCE_BOUND_S
            final = listed(a)
            assert {task: sha for task, (_v, sha) in final.items()} == uploaded
            for task in sorted(expected):  # the same bytes served by both, and the same outputs
                downloads = [client.get(f"{srv.url}/prefixes/{task}/artifact") for srv in (a, b)]
                assert [d.status_code for d in downloads] == [200, 200], task
                digests = {hashlib.sha256(d.content).hexdigest() for d in downloads}
                assert len(digests) == 1, task
                outputs = [client.post(f"{srv.url}/generate", params={"task": task},
                                       json={"prompt": "hello", "max_new_tokens": 4}) for srv in (a, b)]
                assert [o.status_code for o in outputs] == [200, 200], [o.text for o in outputs]
                assert outputs[0].json()["token_ids"] == outputs[1].json()["token_ids"], task
            print(f"converged {took:.1f} s after FLUSHALL; {len(statuses)} generate requests meanwhile")
        for proc in procs:
            assert "Traceback" not in proc.log_text(), proc.log_tail()
