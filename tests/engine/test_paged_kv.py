"""The paged key/value cache against PEFT: prefix-cache hits, preemption and shared task prefixes change no
token, for every row kind; and the block accounting the scheduler relies on, without a model."""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest
import torch

from server.engine import attention, cpu_kernels, runner
from server.engine.attention import DecodeGroup, PrefillChunk
from server.engine.block_manager import BlockManager
from server.engine.engine import Engine, EngineConfig
from server.engine.merged_attention import attend_chunk, attend_runs
from server.engine.model import wrap_model
from server.engine.runner import decode_groups
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence
from tests.helpers.support import KINDS, VOCAB, assert_oracle_tokens, make_adapter, tiny_model

BLOCK = 4


def params(n: int = 6) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def run(engine: Engine, seqs: list[Sequence]) -> None:
    for seq in seqs:
        engine.submit(seq)
    engine.run_until_idle()
    # ignore_eos: a request that failed (its error is the front end's to keep) has fewer tokens
    assert all(len(seq.output_ids) == seq.params.max_new_tokens for seq in seqs)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return wrap_model(tiny_model("llama", seed=3), tokenizer, "llama")


def test_prefix_cache_hits_change_no_token_for_any_row_kind(llama, tmp_path):
    """A shared preamble is computed once per (tenant, task): later requests take its full blocks from the
    cache, and their greedy outputs equal PEFT's and those of an engine without prefix caching."""
    adapters = [make_adapter(llama, kind, n, tmp_path, seed)
                for seed, (kind, n) in enumerate(zip(KINDS[:4], [5, 3, 4, 6]))]
    rng = random.Random(0)
    preamble = [rng.randrange(3, VOCAB) for _ in range(23)]
    prefixes = [None, *(a.prefix for a in adapters)]

    def wave(engine: Engine) -> list[Sequence]:
        seqs = [Sequence(preamble + [rng.randrange(3, VOCAB) for _ in range(3)], params(), prefix)
                for prefix in prefixes for _ in range(2)]
        run(engine, seqs)
        return seqs

    cached = Engine(llama, EngineConfig(max_batch_size=4, block_size=BLOCK))
    cold, warm = wave(cached), wave(cached)
    plain = Engine(llama, EngineConfig(max_batch_size=4, block_size=BLOCK, prefix_caching=False))
    for seqs in (cold, warm):
        for seq in seqs:
            again = Sequence(list(seq.prompt_ids), params(), seq.prefix)
            run(plain, [again])
            assert again.num_cached_tokens == 0
            assert again.output_ids == seq.output_ids
    # every warm request hit every full block of the preamble (the virtual tokens of soft prompts come first)
    for seq in warm:
        expected = (seq.num_soft_tokens + len(preamble)) // BLOCK * BLOCK
        assert seq.num_cached_tokens == expected, (seq.num_soft_tokens, seq.num_cached_tokens)
    for seq, adapter in zip(warm, [None, None, *[a for a in adapters for _ in range(2)]]):
        model = adapter.oracle if adapter else llama.model
        assert_oracle_tokens(model, seq.prompt_ids, seq.output_ids, "warm")
    assert cached.blocks.cache_hits > 0 and cached.blocks.cache_queries > cached.blocks.cache_hits


def test_cached_blocks_are_not_shared_across_tasks_or_tenants(llama, tmp_path):
    task = make_adapter(llama, "prefix", 4, tmp_path, 0)
    engine = Engine(llama, EngineConfig(block_size=BLOCK))
    prompt = list(range(10, 30))
    first = Sequence(prompt, params(2), task.prefix, tenant="a")
    run(engine, [first])
    others = [Sequence(prompt, params(2), None, tenant="a"),  # same tokens, base model
              Sequence(prompt, params(2), task.prefix, tenant="b")]  # same task, another tenant
    run(engine, others)
    assert [seq.num_cached_tokens for seq in others] == [0, 0]
    same = Sequence(prompt, params(2), task.prefix, tenant="a")
    run(engine, [same])
    assert same.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK
    shared = Engine(llama, EngineConfig(block_size=BLOCK, share_prefix_cache=True))
    run(shared, [Sequence(prompt, params(2), None, tenant="a")])
    other_tenant = Sequence(prompt, params(2), None, tenant="b")
    run(shared, [other_tenant])
    assert other_tenant.num_cached_tokens > 0


def test_a_reuploaded_task_version_does_not_hit_the_previous_versions_blocks(llama, tmp_path):
    """Cached prompt blocks hold keys/values computed under one task version's prefix: a re-upload (new
    tensor, whether its values changed or not) starts a chain of its own, and its outputs are its own."""
    v1, other = make_adapter(llama, "prefix", 4, tmp_path, 0), make_adapter(llama, "prefix", 4, tmp_path, 1)
    engine = Engine(llama, EngineConfig(block_size=BLOCK))
    prompt = list(range(10, 30))
    run(engine, [Sequence(prompt, params(2), v1.prefix)])
    again = Sequence(prompt, params(4), v1.prefix)
    run(engine, [again])
    assert again.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK  # the same version hits
    new_values = dataclasses.replace(v1.prefix, tensor=other.prefix.tensor)  # same task, new contents
    same_values = dataclasses.replace(v1.prefix, tensor=v1.prefix.tensor.clone())  # same contents re-sent
    changed, unchanged = Sequence(prompt, params(4), new_values), Sequence(prompt, params(4), same_values)
    run(engine, [changed])
    run(engine, [unchanged])
    assert [changed.num_cached_tokens, unchanged.num_cached_tokens] == [0, 0]
    assert_oracle_tokens(other.oracle, prompt, changed.output_ids, "re-uploaded")
    assert unchanged.output_ids == again.output_ids


def test_preempted_requests_resume_and_match_peft(llama, tmp_path):
    """A pool too small for every request's whole generation: the newest are preempted, recomputed from
    their tokens when they rejoin, and every request still finishes with PEFT's tokens."""
    adapters = [make_adapter(llama, kind, 3, tmp_path, seed) for seed, kind in enumerate(KINDS[:3])]
    rng = random.Random(1)
    per_token = llama.shape.kv_width * 4
    engine = Engine(llama, EngineConfig(max_batch_size=6, block_size=BLOCK,
                                        kv_cache_bytes=24 * BLOCK * per_token))
    seqs, tasks = [], []
    for i in range(6):
        adapter = adapters[i % 3] if i % 4 else None
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 9))]
        seqs.append(Sequence(prompt, params(24), adapter.prefix if adapter else None))
        tasks.append(adapter)
    run(engine, seqs)
    assert engine.blocks.preemptions > 0
    assert sum(seq.num_preemptions for seq in seqs) == engine.blocks.preemptions
    for seq, adapter in zip(seqs, tasks):
        assert len(seq.output_ids) == 24
        assert_oracle_tokens(adapter.oracle if adapter else llama.model, seq.prompt_ids, seq.output_ids,
                             "preempted")
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block came back


def test_long_rows_read_their_slot_runs_as_views_and_match_peft(llama, tmp_path, monkeypatch):
    """A row alone in its decode group reads its runs of consecutive slots as pool views (merged with the
    rest by log-sum-exp) once it is wide enough; thresholds lowered so tiny rows take that path, with the
    prefix blocks and interleaved prompt blocks making several runs and a gathered rest."""
    monkeypatch.setattr(runner, "VIEW_MIN_WIDTH", 12)
    monkeypatch.setattr(runner, "VIEW_MIN_RUN", 2 * BLOCK)
    adapters = [make_adapter(llama, kind, 5, tmp_path, seed) for seed, kind in enumerate(KINDS[:4:3])]
    rng = random.Random(2)
    engine = Engine(llama, EngineConfig(max_batch_size=4, max_step_tokens=24, block_size=BLOCK))
    seqs = [Sequence([rng.randrange(3, VOCAB) for _ in range(n)], params(16), prefix)
            for n, prefix in ((40, None), (3, None), (33, adapters[0].prefix), (29, adapters[1].prefix))]
    taken = []
    original = runner.slot_runs
    monkeypatch.setattr(runner, "slot_runs", lambda row, m: taken.append(original(row, m)) or taken[-1])
    run(engine, seqs)
    assert any(runs and rest for runs, rest in taken)  # views and a gathered rest, merged
    for seq, adapter in zip(seqs, [None, None, *adapters]):
        model = adapter.oracle if adapter else llama.model
        assert_oracle_tokens(model, seq.prompt_ids, seq.output_ids, "runs")


def test_attending_slot_runs_equals_attending_the_gathered_row():
    torch.manual_seed(0)
    keys, values = torch.randn(64, 2, 8), torch.randn(64, 2, 8)
    row = list(range(3, 20)) + [40, 41, 2] + list(range(44, 60))
    runs, rest = runner.slot_runs(row, 8)
    assert runs == ((3, 17), (44, 16)) and rest == [40, 41, 2]
    q = torch.randn(1, 2, 3, 8)
    index = torch.tensor(row)
    group = DecodeGroup(0, 1, index[None], None, torch.tensor([len(row) - 1]), torch.tensor([len(row)]), runs,
                        torch.tensor(rest))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys[index].transpose(0, 1)[None], values[index].transpose(0, 1)[None], scale=0.3)
    torch.testing.assert_close(attend_runs(q, keys, values, group, 0.3), expected)


def test_chunks_after_many_earlier_keys_attend_split_and_match_peft(llama, tmp_path, monkeypatch):
    """Prefill chunks that follow many earlier keys (a task prefix, the prompt's earlier chunks) attend as two
    unmasked calls merged by log-sum-exp; thresholds lowered so the tiny scenario takes that path, for
    prefix-tuning, soft-prompt and base rows, with decode rows in the same steps."""
    monkeypatch.setattr(attention, "SPLIT_MIN_CHUNK", 4)
    monkeypatch.setattr(attention, "SPLIT_MIN_EARLIER", 1)
    # torch's path: the prefill attention kernels take every chunk where they apply (cpu_prefill*.c)
    monkeypatch.setattr(cpu_kernels, "supports_prefill", lambda *args: False)
    split = []
    original = attention.attend_chunk
    monkeypatch.setattr(attention, "attend_chunk", lambda *a: split.append(a[3]) or original(*a))
    adapters = [make_adapter(llama, kind, 6, tmp_path, seed) for seed, kind in enumerate(KINDS[:4:3])]
    rng = random.Random(5)
    engine = Engine(llama, EngineConfig(max_batch_size=4, max_step_tokens=16, block_size=BLOCK))
    seqs = [Sequence([rng.randrange(3, VOCAB) for _ in range(n)], params(8), prefix)
            for n, prefix in ((60, None), (5, None), (45, adapters[0].prefix), (38, adapters[1].prefix))]
    run(engine, seqs)
    assert len(split) > 6
    for seq, adapter in zip(seqs, [None, None, *adapters]):
        model = adapter.oracle if adapter else llama.model
        assert_oracle_tokens(model, seq.prompt_ids, seq.output_ids, "split chunks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_split_chunk_equals_the_masked_attention(dtype):
    torch.manual_seed(0)
    keys, values = torch.randn(300, 2, 16, dtype=dtype), torch.randn(300, 2, 16, dtype=dtype)
    slots = torch.randperm(300)[:90]  # 70 earlier keys, then a chunk of 20 (index == position)
    positions = torch.arange(70, 90)
    mask = torch.arange(90)[None] <= positions[:, None]  # [20, 90]
    q = torch.randn(6, 20, 16, dtype=dtype)  # 6 query heads over 2 key/value heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[None], keys[slots].transpose(0, 1)[None], values[slots].transpose(0, 1)[None], attn_mask=mask,
        scale=0.25, enable_gqa=True)[0].transpose(0, 1)  # [20, 6, 16]
    got = attend_chunk(q, keys, values, PrefillChunk(0, 20, slots, mask, positions), 0.25)
    tolerance = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(got, expected, **tolerance)


def test_a_task_prefix_is_stored_once_for_all_its_requests(llama, tmp_path):
    task = make_adapter(llama, "prefix", 10, tmp_path, 0)  # 10 virtual tokens: 3 blocks of 4
    engine = Engine(llama, EngineConfig(block_size=BLOCK, prefix_caching=False))
    seqs = [Sequence([5 + i, 6, 7], params(3), task.prefix) for i in range(5)]
    for seq in seqs:
        engine.submit(seq)
    engine.step()
    entry = engine.blocks.tasks[id(task.prefix.tensor)]
    assert entry.users == 5 and len(entry.blocks) == 3
    own = [engine.blocks.tables[seq.id].blocks for seq in seqs]
    assert all(len(b) == 1 for b in own)  # 3 prompt tokens + the first output: one block each
    assert engine.blocks.pool.num_free == engine.blocks.num_blocks - 3 - 5
    engine.run_until_idle()
    for seq in seqs:
        assert_oracle_tokens(task.oracle, seq.prompt_ids, seq.output_ids, "shared prefix")
    assert entry.users == 0 and len(entry.blocks) == 3  # kept, for the next request of the task


# -- accounting, no model -----------------------------------------------------------------------------------

def seq_of(n: int, new: int = 8, tenant: str = "t") -> Sequence:
    return Sequence(list(range(3, 3 + n)), SamplingParams(max_new_tokens=new), tenant=tenant)


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first():
    """Three prompts' cached blocks fill the pool once their requests end; a hit makes a prompt's blocks the
    most recently used, so new requests evict the others' first, oldest first."""
    blocks = BlockManager(num_blocks=6, block_size=4)

    def serve(tokens: list[int]) -> Sequence:
        seq = Sequence(tokens, SamplingParams(max_new_tokens=1))
        blocks.join(seq, blocks.cached_prefix(seq))
        blocks.grow(seq, seq.num_tokens - seq.num_computed)
        seq.num_computed = seq.num_tokens
        blocks.computed(seq)
        blocks.leave(seq)
        return seq

    prompts = {name: list(range(first, first + 8)) for name, first in (("a", 10), ("b", 30), ("c", 50))}
    for tokens in prompts.values():
        serve(tokens)  # two full blocks each: the pool is all cached, unreferenced blocks

    def cached(name: str) -> int:  # blocks a request of this prompt (plus one new token) would hit
        return len(blocks.cached_prefix(Sequence(prompts[name] + [99], SamplingParams())))

    assert blocks.pool.num_free == 6 and {name: cached(name) for name in prompts} == {"a": 2, "b": 2, "c": 2}
    # a hit: a's blocks become the most recently used (its ninth token evicts b's first block, the LRU one)
    assert serve(prompts["a"] + [99]).num_cached_tokens == 8
    serve(list(range(70, 78)))  # two blocks: the one freed above and b's second (b's chain is gone)
    assert {name: cached(name) for name in prompts} == {"a": 2, "b": 0, "c": 2}
    serve(list(range(90, 98)))  # then c's (the new prompt's blocks were released after a's)
    assert {name: cached(name) for name in prompts} == {"a": 2, "b": 0, "c": 0}


def test_admission_counts_the_blocks_a_prompt_needs_now_not_its_worst_case():
    blocks = BlockManager(num_blocks=10, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64, long_prefill_threshold=32,
                          watermark=0)
    seqs = [seq_of(6, new=1000) for _ in range(5)]  # each could reach 1006 tokens; each needs 2 blocks now
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert [entry[0] for entry in plan.prefill] == seqs
    assert blocks.pool.num_free == 0


def test_the_newest_running_request_is_preempted_when_blocks_run_out():
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64, long_prefill_threshold=32,
                          watermark=0)
    old, new = seq_of(7), seq_of(7)
    for seq in (old, new):
        scheduler.add(seq)
    scheduler.schedule()
    for seq in (old, new):  # as the runner and engine would: both prefilled, one token sampled each
        seq.num_computed = seq.num_tokens
        seq.output_ids.append(9)
    old.num_computed += 1  # old decoded once more: its next token is its 9th, which needs a third block
    old.output_ids.append(9)
    plan = scheduler.schedule()
    assert plan.preempted == [new] and plan.decode == [old]
    assert new.num_computed == 0 and len(scheduler) == 1 and scheduler.running == [old]


def test_a_long_prompt_leaves_room_for_short_ones_in_each_step():
    blocks = BlockManager(num_blocks=1000, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64, long_prefill_threshold=16)
    long = seq_of(1000)
    scheduler.add(long)
    plan = scheduler.schedule()
    assert plan.prefill == [[long, 64]]  # alone, it takes the whole step
    long.num_computed += 64
    shorts = [seq_of(10, tenant=f"s{i}") for i in range(3)]
    for seq in shorts:
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.prefill[0] == [long, 16 + 64 - 16 - 30]  # held to the threshold, then what was left
    assert [entry for entry in plan.prefill[1:]] == [[seq, 10] for seq in shorts]
    second_long = seq_of(500, tenant="z")
    scheduler.add(second_long)
    long.num_computed += plan.prefill[0][1]
    plan = scheduler.schedule()
    assert second_long not in [entry[0] for entry in plan.prefill]  # one long prefill at a time


def test_short_requests_jump_long_prompts_waiting_for_a_prefill_slot():
    """Found on the real server: the four prompts of one request at the --max-request-tokens cap queued
    their tenant's (and, by stopping admission, every tenant's) short requests behind them for seconds."""
    blocks = BlockManager(num_blocks=10_000, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64, long_prefill_threshold=16)
    longs = [seq_of(1000) for _ in range(3)]
    for seq in longs:
        scheduler.add(seq)
    assert [entry[0] for entry in scheduler.schedule().prefill] == [longs[0]]
    longs[0].num_computed += 64
    mine, theirs = seq_of(10), seq_of(10, tenant="other")
    scheduler.add(mine)
    scheduler.add(theirs)
    admitted = [entry[0] for entry in scheduler.schedule().prefill]
    assert admitted[0] is longs[0] and set(admitted[1:]) == {mine, theirs}
    assert list(scheduler._queues["t"]) == longs[1:]  # the long ones keep their order


def test_decode_groups_keep_short_rows_apart_from_long_ones():
    assert decode_groups([10, 12, 30, 6000]) == [(0, 3), (3, 4)]
    assert decode_groups([5]) == [(0, 1)]
    assert decode_groups([100, 200, 300, 400]) == [(0, 2), (2, 4)]


def test_a_dropped_task_gives_its_blocks_back(llama, tmp_path):
    """The engine process drops a deleted task's tensor: its prefix blocks return to the pool at once."""
    task = make_adapter(llama, "prefix", 10, tmp_path, 0)
    engine = Engine(llama, EngineConfig(block_size=BLOCK))
    prefix = dataclasses.replace(task.prefix, tensor=task.prefix.tensor.clone())  # held by this test only
    run(engine, [Sequence([5, 6, 7], params(2), prefix)])
    assert engine.blocks.pool.num_free == engine.blocks.num_blocks - 3  # the idle task keeps its 3 blocks
    del prefix
    gc.collect()
    assert not engine.blocks.tasks
    assert engine.blocks.pool.num_free == engine.blocks.num_blocks
