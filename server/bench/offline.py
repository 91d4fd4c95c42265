"""In-process measurements: the engine against the bare model and against what a user would run otherwise.

Every comparison runs in the same process, alternating configurations over rounds so that drift on a
noisy machine hits both sides alike; medians are reported. Tasks are random prefix-tuning tensors of the
model's shape: the serving cost depends only on shapes.

The engine is driven through the in-process client (:class:`~server.frontend.local_client.LocalEngineClient`),
with the verbs the server's client has: its figures include following each request as the server's front
end does (token ids collected, the text decoded once at the end), never HTTP.
"""

from __future__ import annotations

import collections.abc
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, GenerationMixin

from prefixes.artifact import ModelShape, PrefixArtifact, PrefixKind
from prefixes.records import ResidentPrefix
from prefixes.store import PrefixStore
from server.bench.clock import DeviceClock, synchronize
from server.engine.engine import EngineConfig
from server.engine.model import BaseModel
from server.engine.sequence import SamplingParams
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState


def random_prefix(s: ModelShape, num_virtual_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s.num_layers, 2, s.num_kv_heads, num_virtual_tokens, s.head_dim, generator=g)


def random_tasks(base: BaseModel, count: int, num_virtual_tokens: int) -> list[ResidentPrefix]:
    tasks = []
    for i in range(count):
        kv = random_prefix(base.shape, num_virtual_tokens, i).to(base.device, base.dtype)
        tasks.append(ResidentPrefix.unstored(f"bench-{i}",
                                             PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "bench")))
    return tasks


def prompt_ids(i: int, length: int) -> list[int]:
    return [(7 * i + j) % 1000 + 10 for j in range(length)]


def make_requests(tasks: collections.abc.Sequence[ResidentPrefix | None], n: int, prompt_tokens: int,
                  new_tokens: int, pick: Callable[[int], int] = lambda i: i) -> list[RequestState]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [RequestState(prompt_ids(i, prompt_tokens), params, tasks[pick(i) % len(tasks)]) for i in range(n)]


# -- the engine ------------------------------------------------------------------------------------------


def submit(client: LocalEngineClient, state: RequestState) -> None:
    """The server's order: check that it fits, then submit."""
    client.check_fits(state)
    client.submit(state)


def engine_decode_tokens_per_s(client: LocalEngineClient, states: list[RequestState]) -> float:
    """Submit all, step until every one is prefilled (a step admits what its token budget allows), then time
    the decode steps that follow."""
    engine = client.engine
    for state in states:
        submit(client, state)
    while engine.num_waiting or engine.num_decoding < engine.num_running:
        client.step()
    tokens, start = 0, time.perf_counter()
    while engine.num_running:
        tokens += client.step()
    return tokens / (time.perf_counter() - start)


def engine_closed_loop_tokens_per_s(client: LocalEngineClient, tasks: list[ResidentPrefix], concurrency: int,
                                    requests: int, prompt_tokens: int, new_tokens: int) -> float:
    """Like the HTTP load at a fixed concurrency, without HTTP: a request joins as soon as another
    finishes."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if submitted < requests:
            state = RequestState(prompt_ids(submitted, prompt_tokens), params, tasks[submitted % len(tasks)])
            state.on_finish = submit_next
            submitted += 1
            submit(client, state)

    start = time.perf_counter()
    for _ in range(concurrency):
        submit_next()
    client.run_until_idle()
    return requests * new_tokens / (time.perf_counter() - start)


def engine_end_to_end_tokens_per_s(client: LocalEngineClient, states: list[RequestState],
                                   concurrent: bool) -> float:
    start = time.perf_counter()
    for state in states:
        submit(client, state)
        if not concurrent:
            client.run_until_idle()
    client.run_until_idle()
    return sum(len(s.output_ids) for s in states) / (time.perf_counter() - start)


def engine_prefill_tokens_per_s(client: LocalEngineClient, prompt: list[int]) -> float:
    """Prompt tokens per second to the first token of one request alone (chunked by the engine's step
    budget, as a server computes it)."""
    state = RequestState(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True), None)
    start = time.perf_counter()
    submit(client, state)
    client.run_until_idle()
    return len(prompt) / (time.perf_counter() - start)


# -- baselines -------------------------------------------------------------------------------------------


@torch.inference_mode()
def bare_prefill_tokens_per_s(base: BaseModel, prompt: list[int]) -> float:
    """The prefill ceiling: the model's own forward over the whole prompt at once (causal SDPA, no cache
    pages, no chunks), keeping the last position's logits as the engine does."""
    ids = torch.tensor([prompt], device=base.device)
    synchronize(base.device)
    start = time.perf_counter()
    base.model(input_ids=ids, logits_to_keep=1)
    synchronize(base.device)
    return len(prompt) / (time.perf_counter() - start)


def prefill_against_bare(base: BaseModel, client: LocalEngineClient, length: int, rounds: int) -> dict:
    """Engine and bare prefill of a ``length``-token prompt, alternating; a new prompt each round (the
    engine's prefix cache would otherwise answer the second)."""
    engine_tps, bare_tps = [], []
    for r in range(rounds):
        prompt = prompt_ids(1000 + r, length)
        engine_tps.append(engine_prefill_tokens_per_s(client, prompt))
        bare_tps.append(bare_prefill_tokens_per_s(base, prompt))
    return {"prompt_tokens": length, "engine_tokens_per_s": statistics.median(engine_tps),
            "bare_tokens_per_s": statistics.median(bare_tps),
            "samples": {"engine": engine_tps, "bare": bare_tps}}


def bare_decode_tokens_per_s(base: BaseModel, batch: int, context: int, steps: int) -> float:
    """The ceiling: the model's own forward pass and cache, same batch and context; no server, no padding,
    no mask, no prefixes."""
    return bare_decode_timing(base, batch, context, steps)["tokens_per_s"]


@torch.inference_mode()
def bare_decode_timing(base: BaseModel, batch: int, context: int, steps: int) -> dict[str, float]:
    """:func:`bare_decode_tokens_per_s`, plus where a step's time goes: ``device_forward_ms``, the device's
    time from the start to the end of a forward; ``host_forward_ms``, the host's time to queue it.

    The loop never waits for the device (the next input is the argmax on the device), so the host may run
    ahead. A ``device_share`` below 1, or a host time as long as the device time, means the host's launches
    pace the device even with nothing between forwards."""
    model, clock = base.model, DeviceClock(base.device)
    ids = torch.tensor([prompt_ids(i, context) for i in range(batch)], device=base.device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    clock.synchronize()
    marks, host = [], 0.0
    start = time.perf_counter()
    for _ in range(steps):
        queued, begin = time.perf_counter(), clock.mark()
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        marks.append((begin, clock.mark()))
        host += time.perf_counter() - queued
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    clock.synchronize()
    wall = time.perf_counter() - start
    device = sum(clock.seconds(a, b) for a, b in marks)
    return {"tokens_per_s": batch * steps / wall, "step_ms": 1e3 * wall / steps,
            "device_forward_ms": 1e3 * device / steps, "host_forward_ms": 1e3 * host / steps,
            "device_share": device / wall}


@torch.inference_mode()
def bare_same_work_tokens_per_s(base: BaseModel, batch: int, prefix_tokens: int, prompt_tokens: int,
                                new_tokens: int) -> float:
    """The bare model doing what the server does for ``batch`` requests, with nothing in between: one prefill
    of all prompts after ``prefix_tokens`` already-cached positions (a task's prefix costs attention, not
    compute), then ``new_tokens - 1`` decode steps (the prefill yields the first token). Output tokens per
    second, prefill included: the end-to-end bound for this workload at this batch size."""
    model = base.model
    prefix = torch.tensor([prompt_ids(i, prefix_tokens) for i in range(batch)], device=base.device)
    ids = torch.tensor([prompt_ids(i + batch, prompt_tokens) for i in range(batch)], device=base.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)  # stands in for the prefix KV copy
    synchronize(base.device)
    start = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(base.device)
    return batch * new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def generate_tokens_per_s(base: BaseModel, groups: list[int], context: int, new_tokens: int) -> float:
    """transformers' `generate`, one call per group of ``groups[i]`` requests, one group after another.

    Groups of 1 are a server without batching; groups of k per task are the per-task static batches a
    PEFT user must run (PEFT batches one adapter at a time). ``context`` includes the prefix length, which
    is what a prefix costs attention (PEFT's own `generate` ignores prefixes on this transformers version,
    so the cost is modelled with plain tokens).
    """
    model = base.model
    assert isinstance(model, GenerationMixin), "a causal LM generates"
    tokens, start = 0, time.perf_counter()
    for g, size in enumerate(groups):
        ids = torch.tensor([prompt_ids(g * 31 + i, context) for i in range(size)], device=base.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - context) * size
    synchronize(base.device)
    return tokens / (time.perf_counter() - start)


# -- the store -------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cold_and_hot_load_ms(base: BaseModel, num_virtual_tokens: int, tasks: int = 20) -> dict[str, float]:
    """Time to make a task servable: from disk (a fresh store, nothing resident) vs already resident."""
    with tempfile.TemporaryDirectory() as root:
        prepare = lambda t: t.to(device=base.device, dtype=base.dtype)
        writer = PrefixStore(Path(root), 1 << 30, prepare)
        for i in range(tasks):
            kv = random_prefix(base.shape, num_virtual_tokens, i)
            writer.put(f"t{i}", PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "bench"))
        reader = PrefixStore(Path(root), 1 << 30, prepare)
        cold, hot = [], []
        for i in range(tasks):
            start = time.perf_counter()
            reader.get(f"t{i}")
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            reader.get(f"t{i}")
            hot.append(time.perf_counter() - start)
    return {"disk_ms": 1e3 * statistics.median(cold), "resident_ms": 1e3 * statistics.median(hot)}


def scale(base: BaseModel, task_counts: list[int], batch: int, prompt_tokens: int, new_tokens: int,
          num_virtual_tokens: int, zipf_s: float = 1.1) -> list[dict]:
    """Register N tasks, serve a Zipf mix of them, and watch throughput and memory as N grows."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        prepare = lambda t: t.to(device=base.device, dtype=base.dtype)
        store = PrefixStore(Path(root), 1 << 40, prepare)
        registered = 0
        for n in task_counts:
            for i in range(registered, n):
                store.put(f"t{i}", PrefixArtifact(PrefixKind.PREFIX_TUNING,
                                                  random_prefix(base.shape, num_virtual_tokens, i), "bench"))
            registered = n
            weights = [1 / (k + 1) ** zipf_s for k in range(n)]
            rng = random.Random(n)
            client = LocalEngineClient(base, EngineConfig(max_batch_size=batch))
            rss_before = rss_bytes()
            resident_before = store.stats.resident_bytes
            for i in range(n):  # make every registered task resident, as a server at steady state would be
                store.get(f"t{i}")
            resident = store.stats.resident_bytes
            grown = rss_bytes() - rss_before
            picks = rng.choices(range(n), weights, k=batch)
            seqs = make_requests([store.get(f"t{k}") for k in picks], batch, prompt_tokens, new_tokens)
            tps = engine_decode_tokens_per_s(client, seqs)
            rows.append({"tasks": n, "decode_tokens_per_s": tps, "resident_bytes": resident,
                         "rss_growth_bytes": grown, "resident_growth_bytes": resident - resident_before})
    return rows
