"""A replica whose Redis is down cannot tell whether a task it has never seen exists: it must say so (503,
Retry-After), not claim the task is unknown (404). Tasks it holds keep serving."""

from __future__ import annotations

import httpx
import pytest
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from prefixes.store import PrefixStore
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import ServerProcess
from tests.helpers.support import save_tiny_llama

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long


def tiny_prefix(seed: int) -> PrefixArtifact:
    """Prefix-tuning KV for support.save_tiny_llama's model: 2 layers, 2 KV heads, head size 16."""
    g = torch.Generator().manual_seed(seed)
    return PrefixArtifact(PrefixKind.PREFIX_TUNING, torch.randn(2, 2, 2, 4, 16, generator=g), "prefix-serve")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("outage-model") / "model", tokenizer, max_positions=256)


def test_an_unseen_task_is_503_while_redis_is_down(tmp_path, tiny_model_dir):
    with RedisServer(tmp_path / "redis") as redis, \
            ServerProcess(tmp_path / "store", tmp_path / "server.log", model=str(tiny_model_dir),
                          extra_args=("--redis-url", redis.url)) as srv:
        other = PrefixStore(tmp_path / "other-replica", 1 << 20, prepare=lambda t: t, redis_url=redis.url)
        other.put("elsewhere", tiny_prefix(1))  # uploaded on another replica: in Redis, never loaded here
        other.close()
        r = httpx.post(f"{srv.url}/prefixes/here",
                       files=[("files", ("p.safetensors", to_own_format(tiny_prefix(2))))])
        assert r.status_code == 201, r.text
        redis.stop()

        body = {"prompt": "hello", "max_new_tokens": 2}
        for r in (httpx.post(f"{srv.url}/generate", params={"task": "elsewhere"}, json=body, timeout=60),
                  httpx.get(f"{srv.url}/prefixes/elsewhere"),
                  httpx.get(f"{srv.url}/prefixes/elsewhere/artifact"),
                  httpx.delete(f"{srv.url}/prefixes/elsewhere")):
            assert r.status_code == 503, (r.request.method, r.request.url.path, r.text)
            assert int(r.headers["retry-after"]) >= 1
            assert "Redis" in r.json()["detail"] and "'elsewhere'" in r.json()["detail"]
        r = httpx.post(f"{srv.url}/v1/completions",
                       json={"model": "elsewhere", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["type"] == "server_error"
        # what this replica holds is still served
        served = httpx.post(f"{srv.url}/generate", params={"task": "here"}, json=body, timeout=60)
        assert served.status_code == 200
        assert [p["task"] for p in httpx.get(f"{srv.url}/prefixes").json()["prefixes"]] == ["here"]
