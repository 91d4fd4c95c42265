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


def test_prefix_cache_hits_show_in_usage_and_metrics_and_counters_move_mid_request(tmp_path):
    """A preamble sent twice is computed once: the second request's ``cached_tokens`` and the prefix-cache
    counters say how much was reused, with the same greedy text; and a long stream's generation tokens are
    counted while it runs, not when it ends."""
    preamble = "You are a careful assistant. " * 12 + "Answer the question in one short sentence.\n"
    with ServerProcess(tmp_path / "store", tmp_path / "server.log") as server:
        url = server.url
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]  # the base model's id
        before = scrape(url)

        def ask(question: str) -> dict:
            body = {"model": model, "prompt": preamble + question, "max_tokens": 8, "temperature": 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        first, second = ask("What is the capital of France?"), ask("What is the capital of France?")
        third = ask("What is the capital of Spain?")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        hit = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert hit > 0 and hit % 16 == 0 and hit < second["usage"]["prompt_tokens"]
        assert 0 < third["usage"]["prompt_tokens_details"]["cached_tokens"] <= hit  # the shared preamble
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        middle = scrape(url)

        def delta(name, now=middle, **labels):
            key = (name, tuple(sorted(labels.items())))
            return now.get(key, 0.0) - before.get(key, 0.0)

        hits = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, second, third))
        assert delta("prefix_serve_kv_prefix_cache_hits_total") == hits
        prompts = sum(r["usage"]["prompt_tokens"] for r in (first, second, third))
        assert delta("prefix_serve_kv_prefix_cache_queries_total") == prompts
        assert delta("prefix_serve_prompt_tokens_total", tenant="default") == prompts - hits

        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"model": model, "prompt": "Count slowly:", "max_tokens": 200,
                                "temperature": 0, "ignore_eos": True, "stream": True}) as stream:
            chunks = 0
            for line in stream.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 20:
                    running = scrape(url)
                    break
        earlier = sum(r["usage"]["completion_tokens"] for r in (first, second, third))
        # 20 chunks received (a chunk may carry more than one token): the stream's tokens are counted already
        assert delta("prefix_serve_generation_tokens_total", running, tenant="default") >= earlier + 20
        assert running[("prefix_serve_kv_cache_usage_perc", ())] > 0
