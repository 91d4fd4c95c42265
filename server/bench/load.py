"""A load generator in the style of `vllm bench serve`, against a real prefix-serve process over HTTP.

Arrivals are either a fixed concurrency (each client sends its next request when the previous answer
ends) or Poisson at a given rate. Tasks are drawn uniformly or by a Zipf law over the registered tasks.
Requests stream (`"stream": true` on /generate) so time to first token and inter-token latency are seen
as a client sees them; a server that does not stream is measured end to end only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True, slots=True)
class LoadSpec:
    requests: int | None  # how many to send (None: as many as `duration` allows)
    concurrency: int | None = None  # fixed concurrency, or
    rate: float | None = None  # Poisson arrivals per second
    tasks: tuple[str | None, ...] = (None,)
    mix: str = "uniform"  # or "zipf", or "distinct" (request i on task i mod N)
    prompt_tokens: int = 32
    new_tokens: int = 64
    seed: int = 0
    duration: float | None = None  # seconds after which no request is sent (those in flight finish)

    def __post_init__(self):
        if self.requests is None and self.duration is None:
            raise ValueError("a load needs a number of requests or a duration")
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a load has either a fixed concurrency or a Poisson rate")
        if self.mix not in ("uniform", "zipf", "distinct"):
            raise ValueError(f"mix {self.mix!r}: choose uniform, zipf or distinct")


@dataclass(slots=True)
class RequestResult:
    start: float
    end: float
    first_token: float | None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = True


def _prompt(i: int, tokens: int) -> str:
    # Distinct, roughly `tokens` long: one short word per token for this tokenizer family.
    return " ".join(f"w{(i * 7 + j) % 997}" for j in range(max(1, tokens // 2)))


def _choose_tasks(spec: LoadSpec) -> Iterator[tuple[int, str | None]]:
    """(request index, task) for each request to send, in order; endless when ``spec.requests`` is None."""
    rng = random.Random(spec.seed)
    n = len(spec.tasks)
    weights = [1 / (k + 1) ** 1.1 for k in range(n)] if spec.mix == "zipf" else [1] * n
    for i in itertools.count() if spec.requests is None else range(spec.requests):
        if spec.mix == "distinct":
            yield i, spec.tasks[i % n]
        else:
            yield i, spec.tasks[rng.choices(range(n), weights)[0]]


async def _one(client: httpx.AsyncClient, url: str, task: str | None, prompt: str,
               new_tokens: int) -> RequestResult:
    params = {"task": task} if task else {}
    body = {"prompt": prompt, "max_new_tokens": new_tokens, "ignore_eos": True, "stream": True}
    result = RequestResult(start=time.perf_counter(), end=0.0, first_token=None)
    async with client.stream("POST", f"{url}/generate", params=params, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            result.ok, result.end = False, time.perf_counter()
            return result
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            payload = json.loads(await response.aread())
            result.end = time.perf_counter()
            result.tokens = len(payload["token_ids"])
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            new = len(chunk.get("token_ids") or [])
            if new:
                now = time.perf_counter()
                result.first_token = result.first_token or now
                result.token_times.extend([now] * new)
                result.tokens += new
    result.end = time.perf_counter()
    return result


async def complete_openai(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """One streamed ``/v1/completions`` request (``body`` without ``stream``), as any OpenAI-compatible server
    answers it: a token time per chunk that carries text, and the token count from the closing ``usage``
    chunk (a chunk may carry several tokens when the client lags; the usage count is exact)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(start=time.perf_counter(), end=0.0, first_token=None)
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            result.ok, result.end = False, time.perf_counter()
            return result
        usage = None
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            usage = chunk.get("usage") or usage
            if any(choice.get("text") for choice in chunk.get("choices") or []):
                now = time.perf_counter()
                result.first_token = result.first_token or now
                result.token_times.append(now)
                result.tokens += 1
    result.end = time.perf_counter()
    if usage is not None:
        result.tokens = usage["completion_tokens"]
    return result


async def run_load(url: str, spec: LoadSpec, headers: dict[str, str] | None = None) -> dict:
    """Send ``spec``'s requests to the server at ``url`` (``headers`` on each, e.g. an API key); their
    summary."""
    requests = _choose_tasks(spec)
    rng = random.Random(spec.seed + 1)
    limits = httpx.Limits(max_connections=(spec.concurrency or 256) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        deadline = start + spec.duration if spec.duration is not None else float("inf")

        def next_request() -> tuple[int, str | None] | None:
            return next(requests, None) if time.perf_counter() < deadline else None

        if spec.concurrency is not None:

            async def worker():
                out = []
                while (request := next_request()) is not None:
                    i, task = request
                    out.append(await _one(client, url, task, _prompt(i, spec.prompt_tokens), spec.new_tokens))
                return out

            results = [r for group in await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
                       for r in group]
        else:
            assert spec.rate is not None, "LoadSpec has a rate when it has no concurrency"
            pending = []
            while (request := next_request()) is not None:
                i, task = request
                pending.append(asyncio.create_task(
                    _one(client, url, task, _prompt(i, spec.prompt_tokens), spec.new_tokens)))
                await asyncio.sleep(rng.expovariate(spec.rate))
            results = list(await asyncio.gather(*pending))
        wall = time.perf_counter() - start
    return summarise(results, wall, spec.concurrency)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}


def steady_token_throughput(results: list[RequestResult], concurrency: int | None) -> float | None:
    """Tokens/s while all ``concurrency`` clients are busy: from the moment the first wave has all its first
    tokens (ramp-up over) to the moment the last request is sent (after that, clients run out of work and
    the load drains). None when the run is too short to have such a window."""
    if concurrency is None or len(results) <= concurrency or not all(r.ok for r in results):
        return None
    by_start = sorted(results, key=lambda r: r.start)
    first_wave = [r.first_token for r in by_start[:concurrency] if r.first_token is not None]
    if len(first_wave) < concurrency:  # one of the first wave got no token
        return None
    begin, end = max(first_wave), by_start[-1].start
    if end <= begin:
        return None
    return sum(begin <= t <= end for r in results for t in r.token_times) / (end - begin)


def decode_token_throughput(results: list[RequestResult]) -> float | None:
    """Tokens/s while every request is decoding: from the last first token (every prompt is prefilled) to
    the first last token (no request has finished). For a burst (all requests sent at once) this is the
    server's decode rate at that batch size, over HTTP, as its streaming clients see it. None when the
    window is empty or a request did not stream."""
    if not results or not all(r.ok and len(r.token_times) > 1 for r in results):
        return None
    # every request streamed tokens, so each has its first token's time
    begin = max(r.first_token for r in results if r.first_token is not None)
    end = min(r.token_times[-1] for r in results)
    if end <= begin:
        return None
    # Half-open on the left: the tokens of the step that completed the last prefill arrive at `begin` or
    # just after, and the last step's tokens of other streams may arrive just after `end`; the two edges
    # miss and add about one step's tokens each, so they cancel.
    return sum(begin < t <= end for r in results for t in r.token_times) / (end - begin)


def summarise(results: list[RequestResult], wall: float, concurrency: int | None = None) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
        "request_throughput": len(ok) / wall, "token_throughput": tokens / wall,
        "steady_token_throughput": steady_token_throughput(results, concurrency),
        "decode_token_throughput": decode_token_throughput(ok) if len(results) == concurrency else None,
        "ttft_s": _percentiles([r.first_token - r.start for r in ok if r.first_token is not None]),
        "itl_s": _percentiles(itl),
        "e2e_s": _percentiles([r.end - r.start for r in ok]),
    }
