"""The engine must produce PEFT's tokens exactly, for every architecture, in mixed continuous batches.

Each scenario mixes prefix-tuning (bare and MLP-reparameterised), P-Tuning v1, prompt tuning, ChatGLM
P-Tuning v2 checkpoints (bare and projected) and base-model rows, with different prefix and prompt lengths,
and lets requests arrive while others decode.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from server.engine.engine import ContextTooLong, Engine, EngineConfig
from server.engine.model import SUPPORTED_MODEL_TYPES, UnsupportedModel, wrap_model
from server.engine.sequence import SamplingParams, Sequence
from tests.helpers.support import (
    KINDS,
    NEAR_TIE,
    NO_ADAPTATION,
    TINY_CONFIGS,
    VOCAB,
    assert_oracle_tokens,
    make_adapter,
    oracle_logits,
    tiny_model,
)


def run_staggered(engine: Engine, seqs: list[Sequence], arrivals: list[int]) -> None:
    """Submit ``seqs[i]`` before step ``arrivals[i]``, stepping until all are done."""
    pending = sorted(zip(arrivals, range(len(seqs))))
    step = 0
    while pending or engine.num_running or engine.num_waiting:
        while pending and pending[0][0] <= step:
            engine.submit(seqs[pending.pop(0)[1]])
        engine.step()
        step += 1


def check_against_oracle(base, adapters, seqs, tasks, near_tie: float = NEAR_TIE, reference=None) -> None:
    """``reference``: the base model as it was before an Engine routed its attention (default:
    ``base.model``)."""
    reference = base.model if reference is None else reference
    changed = {a.name: False for a in adapters}
    for seq, adapter in zip(seqs, tasks):
        model = adapter.oracle if adapter else reference
        assert len(seq.output_ids) == seq.params.max_new_tokens
        assert_oracle_tokens(model, seq.prompt_ids, seq.output_ids, f"{adapter.name if adapter else 'base'}",
                             near_tie)
        if adapter is not None:
            # The prefix must really matter, or matching PEFT would prove nothing.
            with_prefix = oracle_logits(adapter.oracle, seq.prompt_ids, seq.output_ids)
            without = oracle_logits(reference, seq.prompt_ids, seq.output_ids)
            changed[adapter.name] |= bool((with_prefix.argmax(-1) != without.argmax(-1)).any())
    unchanged = [k for k, v in changed.items() if not v]
    assert all(changed.values()), f"adapters that never changed a token: {unchanged}"


# Whole prompts in one step for the first six families; every family with chunked prefill (the harder layout).
FIRST_SIX = ("gpt2", "gpt_neox", "llama", "mistral", "opt", "qwen2")
SCENARIOS = [pytest.param(arch, 512, id=f"{arch}-whole-prompts") for arch in FIRST_SIX] + [
    pytest.param(arch, 7, id=f"{arch}-chunked-prefill") for arch in sorted(TINY_CONFIGS)]


# A seed whose random model some adapter kind would otherwise leave unchanged on this scenario's prompts.
MODEL_SEEDS = {"cohere": 1, "falcon": 1, "nemotron": 4}


def test_every_supported_family_has_a_tiny_model():
    assert sorted(TINY_CONFIGS) == sorted(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize(("arch", "step_tokens"), SCENARIOS)
def test_mixed_batch_matches_peft(arch, step_tokens, tokenizer, tmp_path):
    """With 7 tokens a step, prompts and soft prompts are split across steps (mid-virtual-token too)."""
    base = wrap_model(tiny_model(arch, seed=MODEL_SEEDS.get(arch, 0)), tokenizer, arch)
    reference = copy.deepcopy(base.model)  # the Engine may route the attention of base.model (Falcon)
    # Families served with no adaptation get PEFT's four kinds (the ChatGLM file format is family-independent)
    # and a shorter scenario; the adapted ones and the first six get everything.
    kinds = KINDS[:4] if arch in NO_ADAPTATION else KINDS
    lengths = [5, 2, 7, 3, 4, 6]
    adapters = [make_adapter(base, kind, n, tmp_path, seed) for seed, (kind,
                                                                       n) in enumerate(zip(kinds, lengths))]
    rng = random.Random(arch)
    seqs, tasks, arrivals = [], [], []
    for i in range(10 if arch in NO_ADAPTATION else 14):
        adapter = None if i % (len(adapters) + 1) == len(adapters) else adapters[i % len(adapters)]
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(max_new_tokens=rng.randint(2, 10), ignore_eos=True)
        seqs.append(Sequence(prompt, params, adapter.prefix if adapter else None))
        tasks.append(adapter)
        arrivals.append(0 if i < 5 else rng.randint(1, 12))
    run_staggered(Engine(base, EngineConfig(max_batch_size=6, max_step_tokens=step_tokens)), seqs, arrivals)
    check_against_oracle(base, adapters, seqs, tasks, reference=reference)


def test_cache_layout_under_churn(tokenizer, tmp_path):
    """Long prompts chunked over many steps beside short ones, rows leaving from every position, growth."""
    base = wrap_model(tiny_model("llama", seed=3), tokenizer, "llama")
    adapters = [make_adapter(base, kind, n, tmp_path, seed)
                for seed, (kind, n) in enumerate([("prefix", 20), ("prompt_tuning", 9), ("prefix", 1)])]
    rng = random.Random(7)
    seqs, tasks, arrivals = [], [], []
    for i in range(24):
        adapter = rng.choice([None, *adapters])
        prompt = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 3, 40, 90]))]
        seqs.append(Sequence(prompt, SamplingParams(max_new_tokens=rng.randint(1, 30), ignore_eos=True),
                             adapter.prefix if adapter else None))
        tasks.append(adapter)
        arrivals.append(rng.randint(0, 60))
    engine = Engine(base, EngineConfig(max_batch_size=6, kv_cache_bytes=6 * 200 * base.shape.kv_width * 4,
                                       max_step_tokens=16))
    run_staggered(engine, seqs, arrivals)
    check_against_oracle(base, adapters, seqs, tasks)


def test_long_prompt_does_not_stall_running_requests(tokenizer):
    """Chunked prefill: while a long prompt is prefilled over several steps, every running request still
    gets a token each step, and no step computes more than the budget."""
    base = wrap_model(tiny_model("llama", seed=5), tokenizer, "llama")
    engine = Engine(base, EngineConfig(max_batch_size=4, max_step_tokens=10))
    sizes: list[int] = []
    embed = engine.runner.embed  # every step embeds its packed token ids [T] once, whichever forward runs
    engine.runner.embed = lambda ids: sizes.append(ids.shape[0]) or embed(ids)
    running = [Sequence([3, 4, 5], SamplingParams(max_new_tokens=30, ignore_eos=True)) for _ in range(3)]
    for seq in running:
        engine.submit(seq)
    engine.step()  # all three prefilled (9 tokens) with their first token
    assert [len(s.output_ids) for s in running] == [1, 1, 1]
    long = Sequence(list(range(1, 50)), SamplingParams(max_new_tokens=3, ignore_eos=True))  # 49 tokens
    engine.submit(long)
    steps = 0
    while not long.output_ids:
        engine.step()
        steps += 1
        assert [len(s.output_ids) for s in running] == [1 + steps] * 3  # nobody waited for the long prompt
    assert steps == 7  # 49 prompt tokens at 10 - 3 = 7 per step
    assert sizes[1:] == [10] * 7  # 3 decode tokens + 7 prompt tokens, every step
    engine.runner.embed = embed
    engine.run_until_idle()
    assert_oracle_tokens(base.model, long.prompt_ids, long.output_ids, "long prompt")
    for seq in running:
        assert_oracle_tokens(base.model, seq.prompt_ids, seq.output_ids, "running")


def test_seeded_sampling_ignores_batch_neighbours(tokenizer, tmp_path):
    base = wrap_model(tiny_model("llama", seed=1), tokenizer, "llama")
    adapter = make_adapter(base, "prefix", 4, tmp_path, 0)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)

    def run(with_neighbours: bool) -> list[int]:
        engine = Engine(base)
        seq = Sequence([5, 6, 7], params, adapter.prefix)
        others = [Sequence([i + 1] * (i + 2),
                           SamplingParams(max_new_tokens=9, temperature=0.7, ignore_eos=True))
                  for i in range(5)] if with_neighbours else []
        for s in [*others[:2], seq, *others[2:]]:
            engine.submit(s)
        engine.run_until_idle()
        return seq.output_ids

    alone = run(False)
    assert run(True) == alone
    other_seed = Engine(base)
    seq = Sequence([5, 6, 7], dataclasses.replace(params, seed=99), adapter.prefix)
    other_seed.submit(seq)
    other_seed.run_until_idle()
    assert seq.output_ids != alone, "a different seed should give a different sample"


def test_top_k_one_is_greedy(tokenizer):
    base = wrap_model(tiny_model("gpt2"), tokenizer, "gpt2")
    engine = Engine(base)
    greedy = Sequence([1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True))
    top1 = Sequence([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))
    engine.submit(greedy)
    engine.submit(top1)
    engine.run_until_idle()
    assert greedy.output_ids == top1.output_ids


def test_context_limit_is_a_client_error(tokenizer, tmp_path):
    base = wrap_model(tiny_model("llama"), tokenizer, "llama")  # 512 positions
    adapter = make_adapter(base, "prefix", 10, tmp_path, 0)
    engine = Engine(base)
    with pytest.raises(ContextTooLong, match="exceeds the model's context of 512"):
        engine.submit(Sequence([1] * 400, SamplingParams(max_new_tokens=103), adapter.prefix))
    engine.submit(Sequence([1] * 400, SamplingParams(max_new_tokens=102, ignore_eos=True), adapter.prefix))
    engine.run_until_idle()


def test_unsupported_architecture_is_refused(tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    assert "bloom" not in SUPPORTED_MODEL_TYPES
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedModel, match="not supported"):
        wrap_model(model, tokenizer, "bloom")


@pytest.mark.slow
def test_default_model_mixed_batch_matches_peft(default_model, tokenizer, tmp_path):
    """The real SmolLM2-135M-Instruct: every adapter kind plus base rows, requests joining mid-decode."""
    base = default_model
    specs = [("prefix", 10), ("prefix", 3), ("prompt_tuning", 6), ("p_tuning", 4), ("chatglm_projection", 5)]
    # Real embeddings have norm ~3: soft prompts keep PEFT's scale, KV prefixes are enlarged to matter.
    adapters = [make_adapter(base, kind, n, tmp_path, seed,
                             scale={"prompt_tuning": 1.0, "p_tuning": 2.0}.get(kind, 4.0))
                for seed, (kind, n) in enumerate(specs)]
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
               "Translate to French: good morning", "def fibonacci(n):", "Once upon a time",
               "The best way to learn is", "Q: What is 2+2?\nA:"]
    assignment = [0, 2, 3, None, 4, 1, 3, None]  # index into adapters; None is the base model
    seqs, tasks = [], []
    for prompt, which in zip(prompts, assignment):
        adapter = None if which is None else adapters[which]
        seqs.append(Sequence(tokenizer(prompt)["input_ids"],
                             SamplingParams(max_new_tokens=8 + len(seqs), ignore_eos=True),
                             adapter.prefix if adapter else None))
        tasks.append(adapter)
    # 12 tokens a step: prompts and soft prompts are chunked while others decode.
    run_staggered(Engine(base, EngineConfig(max_batch_size=8, max_step_tokens=12)), seqs,
                  [0, 0, 0, 2, 3, 5, 5, 9])
    check_against_oracle(base, adapters, seqs, tasks)
