"""Tenants over HTTP: keys, isolation, shared tasks, quotas, and fair scheduling under a flood."""

from __future__ import annotations

import hashlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from server.engine.block_manager import BlockManager
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence
from tests.helpers.server_process import ServerSpec
from tests.helpers.support import race

pytestmark = pytest.mark.slow

KEYS = {"acme": "acme-key", "globex": "globex-secret", "tiny": "tiny-key", "few": "few-key",
        "small": "small-key", "admin": "root-key"}
ONE_TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # artifact_file(seed, virtual_tokens=1)
SMALL_QUOTA = 3 * ONE_TOKEN_BYTES + ONE_TOKEN_BYTES // 2
PROMPT = "The capital of France is"


def artifact_file(seed: int, virtual_tokens: int = 6) -> bytes:
    """A prefix-tuning task for SmolLM2-135M (30 layers, 3 KV heads, head size 64), strong enough to
    matter."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(30, 2, 3, virtual_tokens, 64, generator=g) * 3
    return to_own_format(PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "prefix-serve"))


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def server_spec() -> ServerSpec:
    return ServerSpec(auth={
        "admin_keys": [KEYS["admin"]],
        "tenants": {
            "acme": {"api_keys": [KEYS["acme"]]},
            # stored hashed: the server never needs the plain key
            "globex": {"api_keys": ["sha256:" + hashlib.sha256(KEYS["globex"].encode()).hexdigest()],
                       "max_concurrent_requests": 1},
            "tiny": {"api_keys": [KEYS["tiny"]], "max_tasks": 1, "max_bytes": 300_000},
            "few": {"api_keys": [KEYS["few"]], "max_tasks": 3},
            "small": {"api_keys": [KEYS["small"]], "max_bytes": SMALL_QUOTA},
        },
    }, extra_args=("--max-batch-size", "2", "--max-waiting-requests", "16"))


def upload(server, caller, task, data, **params):
    return httpx.post(f"{server.url}/prefixes/{task}", params=params, headers=auth(caller),
                      files=[("files", ("prefix.safetensors", data))], timeout=60)


def generate(server, caller, task=None, **body):
    params = {"task": task} if task else {}
    return httpx.post(f"{server.url}/generate", params=params, headers=auth(caller),
                      json={"prompt": PROMPT, "max_new_tokens": 8, **body}, timeout=300)


def test_keys_are_required_except_for_health(server):
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # no --public-metrics
    assert httpx.get(f"{server.url}/metrics", headers=auth("acme")).status_code == 403  # names every tenant
    assert httpx.get(f"{server.url}/metrics", headers=auth("admin")).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS['acme']}"}):
        r = httpx.post(f"{server.url}/generate", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server.url}/prefixes", headers=headers).status_code == 401
    assert generate(server, "acme").status_code == 200
    assert generate(server, "globex").status_code == 200  # a key stored as sha256:<hex>


def test_tasks_are_private_and_names_are_per_tenant(server):
    assert upload(server, "acme", "summary", artifact_file(1)).status_code == 201
    assert upload(server, "globex", "summary", artifact_file(2)).status_code == 201
    acme = generate(server, "acme", "summary").json()
    globex = generate(server, "globex", "summary").json()
    assert acme["token_ids"] != globex["token_ids"]  # same name, each tenant its own prefix
    assert upload(server, "acme", "acme-only", artifact_file(3)).status_code == 201
    # globex cannot see, use, inspect, download or delete acme's task: answered as if it did not exist
    assert generate(server, "globex", "acme-only").status_code == 404
    assert httpx.get(f"{server.url}/prefixes/acme-only", headers=auth("globex")).status_code == 404
    assert httpx.get(f"{server.url}/prefixes/acme-only/artifact", headers=auth("globex")).status_code == 404
    assert httpx.delete(f"{server.url}/prefixes/acme-only", headers=auth("globex")).status_code == 404
    listed = httpx.get(f"{server.url}/prefixes", headers=auth("globex")).json()["prefixes"]
    assert {p["task"] for p in listed} == {"summary"}
    assert all(p["owner"] == "globex" for p in listed)
    # globex writing "acme-only" creates its own task; acme's is untouched
    assert upload(server, "globex", "acme-only", artifact_file(4)).status_code == 201
    assert generate(server, "acme", "acme-only").json()["token_ids"] != \
        generate(server, "globex", "acme-only").json()["token_ids"]
    assert httpx.get(f"{server.url}/prefixes/acme-only", headers=auth("acme")).json()["version"] == 1
    # a tenant may not act on another tenant's tasks even by asking
    r = httpx.delete(f"{server.url}/prefixes/summary", params={"tenant": "acme"}, headers=auth("globex"))
    assert r.status_code == 403


def test_admin_publishes_to_every_tenant(server):
    r = upload(server, "admin", "house-style", artifact_file(5))
    assert r.status_code == 201 and r.json()["owner"] == "_shared"
    outputs = [generate(server, t, "house-style").json()["token_ids"] for t in ("acme", "globex", "tiny")]
    assert outputs[0] == outputs[1] == outputs[2]
    assert "house-style" in {p["task"] for p in httpx.get(f"{server.url}/prefixes", headers=auth("acme"))
                             .json()["prefixes"]}
    # tenants use it but cannot change it: their delete addresses their own namespace
    assert httpx.delete(f"{server.url}/prefixes/house-style", headers=auth("acme")).status_code == 404
    assert generate(server, "acme", "house-style").status_code == 200
    # an admin may manage a tenant's task explicitly
    assert upload(server, "admin", "by-admin", artifact_file(6), tenant="acme").json()["owner"] == "acme"
    assert generate(server, "acme", "by-admin").status_code == 200
    assert generate(server, "globex", "by-admin").status_code == 404


def test_storage_quota_is_429_without_retry_after(server):
    """Over a stored-task quota waiting frees nothing (a delete does), so no Retry-After invites a retry."""
    assert upload(server, "tiny", "first", artifact_file(7)).status_code == 201
    r = upload(server, "tiny", "second", artifact_file(8))
    assert r.status_code == 429 and "retry-after" not in r.headers
    assert "quota is 1" in r.json()["detail"]
    # replacing the one task is within the count, but a bigger prefix breaks the byte quota
    assert upload(server, "tiny", "first", artifact_file(9)).status_code == 201
    r = upload(server, "tiny", "first", artifact_file(10, virtual_tokens=40))
    assert r.status_code == 429 and "quota of 300000" in r.json()["detail"]
    assert httpx.get(f"{server.url}/prefixes/first", headers=auth("tiny")).json()["version"] == 2


@pytest.mark.parametrize(("tenant", "refusal"),
                         [("few", "quota is 3"), ("small", f"quota of {SMALL_QUOTA}")])
def test_concurrent_uploads_stay_within_the_storage_quota(server, tenant, refusal):
    """Ten uploads at once under a quota of three tasks (or of three tasks' bytes): the check and the write
    are one step, so exactly three are stored (before, a race stored 5 or 10)."""
    responses = race([lambda i=i: upload(server, tenant, f"t{i}", artifact_file(i, virtual_tokens=1))
                      for i in range(10)])
    codes = sorted(r.status_code for r in responses)  # type: ignore[attr-defined]
    assert codes == [201] * 3 + [429] * 7, codes
    refused = next(r for r in responses if r.status_code == 429)  # type: ignore[attr-defined]
    assert "retry-after" not in refused.headers and refusal in refused.json()["detail"]
    listed = httpx.get(f"{server.url}/prefixes", headers=auth(tenant)).json()["prefixes"]
    assert sorted(p["task"] for p in listed if p["owner"] == tenant) == sorted(
        f"t{i}" for i, r in enumerate(responses) if r.status_code == 201)  # type: ignore[attr-defined]


def test_concurrency_quota_is_429(server):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: generate(server, "globex", max_new_tokens=40, ignore_eos=True),
                                range(4)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    limited = next(r for r in results if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    metrics = httpx.get(f"{server.url}/metrics", headers=auth("admin")).text
    assert 'prefix_serve_requests_total{outcome="rate_limited",tenant="globex"}' in metrics


def test_a_flooding_tenant_does_not_starve_another(server):
    """Batch size 2: acme floods 10 long requests, then globex sends one. First come first served would
    make globex wait for five batches; per-tenant round robin lets it in at the next free slot."""
    def timed(tenant):
        start = time.perf_counter()
        r = generate(server, tenant, max_new_tokens=24, ignore_eos=True)
        assert r.status_code == 200, r.text
        return time.perf_counter() - start

    alone = statistics.median(timed("acme") for _ in range(2))
    with ThreadPoolExecutor(12) as pool:
        flood = [pool.submit(timed, "acme") for _ in range(10)]
        time.sleep(0.5 * alone)  # the flood is queued and the batch is full
        light = pool.submit(timed, "globex").result()
        heavy = [f.result() for f in flood]
    heavy.sort()
    assert heavy[-1] > 4 * alone  # the flood really queued
    # First come first served would finish the light request after the whole flood; fair admission
    # finishes it ahead of most of the flood, which was queued before it.
    assert light < heavy[len(heavy) // 2] and light < 0.6 * heavy[-1], \
        f"light tenant took {light:.2f}s; flood latencies {[round(h, 2) for h in heavy]}; alone {alone:.2f}s"


def test_scheduler_takes_tenants_in_turn():
    scheduler = Scheduler(BlockManager(num_blocks=100, block_size=16), max_batch_size=3, max_step_tokens=512,
                          long_prefill_threshold=256)
    params = SamplingParams(max_new_tokens=4)
    heavy = [Sequence([1, 2], params, tenant="heavy") for _ in range(5)]
    light = [Sequence([1, 2], params, tenant="light") for _ in range(2)]
    for seq in heavy + light:
        scheduler.add(seq)
    picked = [seq for seq, _ in scheduler.schedule().prefill]
    assert [s.tenant for s in picked] == ["heavy", "light", "heavy"]
    assert picked[0] is heavy[0] and picked[1] is light[0] and picked[2] is heavy[1]  # FCFS within a tenant
    assert len(scheduler) == 4


def test_admin_tenant_parameter_must_name_a_tenant(server):
    # not a name: 400; a name, but no such tenant: 404
    for tenant, status in (("../x", 400), ("nobody", 404), ("a/b", 400)):
        r = upload(server, "admin", "t1", artifact_file(11), tenant=tenant)
        assert r.status_code == status and repr(tenant) in r.json()["detail"], r.text
        r = httpx.delete(f"{server.url}/prefixes/t1", params={"tenant": tenant}, headers=auth("admin"))
        assert r.status_code == status and repr(tenant) in r.json()["detail"], r.text
    assert httpx.get(f"{server.url}/prefixes/t1", headers=auth("admin")).status_code == 404  # nothing created


def test_hostile_artifacts_are_400(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(f"{server.url}/prefixes/deep", headers=auth("acme"), timeout=60,
                   files=[("files", ("adapter_config.json", deep)),
                          ("files", ("adapter_model.safetensors", b"x"))])
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"], r.text
    huge = to_own_format(PrefixArtifact(PrefixKind.PREFIX_TUNING, torch.full((30, 2, 3, 4, 64), 3e38),
                                        "prefix-serve"))
    r = upload(server, "acme", "huge", huge)
    assert r.status_code == 400 and "exceed 10000 in magnitude" in r.json()["detail"], r.text
    # the bound itself is servable: sampling over it stays finite
    g = torch.Generator().manual_seed(12)
    edge = torch.randn(30, 2, 3, 4, 64, generator=g).sign() * 1e4
    assert upload(server, "acme", "edge", to_own_format(
        PrefixArtifact(PrefixKind.PREFIX_TUNING, edge, "prefix-serve"))).status_code == 201
    r = generate(server, "acme", "edge", temperature=1.0, seed=3)
    assert r.status_code == 200, r.text
