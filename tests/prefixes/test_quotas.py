"""Storage quotas hold under concurrent uploads: the check and the write are one step, in one process and
across replicas sharing one Redis."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from prefixes.store import PrefixStore, Quota, QuotaExceeded
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

RACERS = 10
SOFT_BYTES = 4 * 64 * 4  # soft(): 4 float32 virtual tokens of width 64


def soft(seed: int) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    return PrefixArtifact(PrefixKind.P_TUNING, torch.randn(4, 64, generator=g), "peft")


def race(calls) -> list[object]:
    """Run ``calls`` at once (released together by a barrier); each one's result or exception."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the refusals are what the test counts
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


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


# ---------------------------------------------------------------------------------------------------------
# Over HTTP, against the real server


def kv_file(seed: int) -> bytes:
    """A one-token prefix for SmolLM2-135M (30 layers, 3 KV heads, head size 64): 46080 bytes."""
    g = torch.Generator().manual_seed(seed)
    return to_own_format(PrefixArtifact(PrefixKind.PREFIX_TUNING, torch.randn(30, 2, 3, 1, 64, generator=g),
                                        "prefix-serve"))


KV_BYTES = 30 * 2 * 3 * 64 * 4


@pytest.mark.slow
def test_concurrent_uploads_over_http_stay_within_the_quotas(tmp_path):
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"tenants": {
        "few": {"api_keys": ["few-key"], "max_tasks": 3},
        "small": {"api_keys": ["small-key"], "max_bytes": 3 * KV_BYTES + KV_BYTES // 2},
    }}))
    with ServerProcess(tmp_path / "store", tmp_path / "server.log",
                       extra_args=("--auth-file", str(auth_file))) as server:
        for tenant, limit in (("few", "quota is 3"), ("small", f"quota of {3 * KV_BYTES + KV_BYTES // 2}")):
            headers = {"Authorization": f"Bearer {tenant}-key"}

            def upload(i: int, headers=headers) -> httpx.Response:
                return httpx.post(f"{server.url}/prefixes/t{i}", headers=headers, timeout=120,
                                  files=[("files", ("prefix.safetensors", kv_file(i)))])

            responses = race([lambda i=i: upload(i) for i in range(RACERS)])
            codes = sorted(r.status_code for r in responses)  # type: ignore[attr-defined]
            assert codes == [201] * 3 + [429] * (RACERS - 3), (tenant, codes)
            refused = next(r for r in responses if r.status_code == 429)  # type: ignore[attr-defined]
            assert refused.headers["retry-after"] == "1" and limit in refused.json()["detail"]
            listed = httpx.get(f"{server.url}/prefixes", headers=headers).json()["prefixes"]
            assert len(listed) == 3
