"""/metrics after known traffic on a real server: every series moves by exactly what the traffic implies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_follow_traffic(tmp_path):
    kv = torch.randn(30, 2, 3, 4, 64, generator=torch.Generator().manual_seed(0))
    data = to_own_format(PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "prefix-serve"))
    with ServerProcess(tmp_path / "store", tmp_path / "server.log") as server:
        url = server.url
        assert httpx.post(f"{url}/prefixes/t", files=[("files", ("t.safetensors", data))]).status_code == 201
        before = scrape(url)
        bodies = [{"prompt": f"Count to {i}:", "max_new_tokens": 5 + i, "ignore_eos": True} for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(
                lambda b: httpx.post(f"{url}/generate", params={"task": "t"}, json=b, timeout=120).json(),
                bodies))
        bad = httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 9000})
        assert bad.status_code == 400
        after = scrape(url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    tenant = {"tenant": "default"}
    completion = sum(r["usage"]["completion_tokens"] for r in results)
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    assert completion == sum(5 + i for i in range(4))
    assert delta("prefix_serve_requests_total", outcome="length", **tenant) == 4
    assert delta("prefix_serve_requests_total", outcome="rejected", **tenant) == 1
    assert delta("prefix_serve_generation_tokens_total", **tenant) == completion
    assert delta("prefix_serve_prompt_tokens_total", **tenant) == prompt
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        assert delta(f"prefix_serve_{histogram}_count", **tenant) == 4, histogram
        assert delta(f"prefix_serve_{histogram}_sum", **tenant) > 0, histogram
    # one inter-token interval per token after each request's first
    assert delta("prefix_serve_inter_token_latency_seconds_count", **tenant) == completion - 4
    # each decode step records its batch size; every token but a request's first (from its prefill)
    # comes from a decode step, so the sizes add up to exactly that
    assert delta("prefix_serve_batch_size_sum") == completion - 4
    assert 0 < delta("prefix_serve_batch_size_count") < completion - 4  # requests really shared steps
    # the task was loaded from disk once (a miss), then served from memory (hits)
    assert delta("prefix_serve_prefix_cache_misses_total", tier="memory") + \
        delta("prefix_serve_prefix_cache_hits_total", tier="memory") == 4
    assert after[("prefix_serve_prefix_cache_resident_tasks", (("tier", "memory"),))] == 1
    assert after[("prefix_serve_num_requests_running", ())] == 0
    assert after[("prefix_serve_num_requests_waiting", ())] == 0
