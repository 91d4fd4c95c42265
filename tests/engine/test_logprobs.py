"""Prompt and output log-probabilities from the engine equal PEFT's forward-pass log-softmax.

Mixed tasks (prefix-tuning, P-Tuning, prompt tuning, the bare model) share the batch; with 7 tokens a step
the prompts' logits arrive over several steps (chunked prefill), and requests join while others decode.
Prompt scoring (``max_new_tokens=0``) leaves without a token. The engine reports logprobs and keeps none:
they are read from the front end's request states, as the in-process client builds them from the step
outputs.
"""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.engine import EngineConfig
from server.engine.model import wrap_model
from server.engine.sequence import SamplingParams
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState
from tests.helpers.support import VOCAB, make_adapter, tiny_model

TOLERANCE = 1e-4


@torch.no_grad()
def peft_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is PEFT's log-softmax after ids[: i + 1] (soft-prompt positions dropped)."""
    x = torch.tensor([ids])
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    return torch.log_softmax(logits[-len(ids):], dim=-1)


def check_entry(entry, expected: torch.Tensor, token: int, top: int, what: str) -> None:
    """``entry`` = (logprob, [(id, logprob)...]) against ``expected`` [V], PEFT's log-softmax."""
    logprob, tops = entry
    assert abs(logprob - float(expected[token])) < TOLERANCE, (what, logprob, float(expected[token]))
    assert len(tops) == top
    best = torch.topk(expected, top).values.tolist()
    for (tid, lp), want in zip(tops, best):
        assert abs(lp - want) < TOLERANCE, (what, tops, best)
        assert abs(lp - float(expected[tid])) < TOLERANCE, (what, tid)


@pytest.mark.parametrize("step_tokens", [512, 7], ids=["whole-prompts", "chunked-prefill"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_match_peft(arch, step_tokens, tokenizer, tmp_path):
    base = wrap_model(tiny_model(arch), tokenizer, arch)
    adapters = [make_adapter(base, kind, n, tmp_path, seed)
                for seed, (kind, n) in enumerate([("prefix", 5), ("p_tuning", 3), ("prompt_tuning", 4)])]
    rng = random.Random(step_tokens)
    client = LocalEngineClient(base, EngineConfig(max_batch_size=6, max_step_tokens=step_tokens))
    seqs, tasks, arrivals = [], [], []
    for i in range(10):
        adapter = None if i % 4 == 3 else adapters[i % 3]
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 16))]
        params = SamplingParams(max_new_tokens=0 if i % 5 == 4 else rng.randint(1, 6), ignore_eos=True,
                                prompt_logprobs=None if i == 2 else rng.choice([0, 1, 5]),
                                logprobs=None if i == 1 else rng.choice([0, 3]))
        seqs.append(RequestState(prompt, params, adapter.prefix if adapter else None))
        tasks.append(adapter)
        arrivals.append(0 if i < 4 else rng.randint(1, 8))
    pending, step = sorted(zip(arrivals, range(len(seqs)))), 0
    while pending or client.num_in_flight:
        while pending and pending[0][0] <= step:
            client.submit(seqs[pending.pop(0)[1]])
        client.step()
        step += 1

    for seq, adapter in zip(seqs, tasks):
        what = f"{adapter.name if adapter else 'base'} prompt={len(seq.prompt_ids)}"
        assert seq.finish_reason.value == "length" and seq.error is None, (what, seq.error)
        assert len(seq.output_ids) == seq.params.max_new_tokens
        expected = peft_logprobs(adapter.oracle if adapter else base.model, seq.prompt_ids + seq.output_ids)
        n = len(seq.prompt_ids)
        if seq.params.prompt_logprobs is None:
            assert seq.prompt_logprobs == []
        else:
            assert len(seq.prompt_logprobs) == n and seq.prompt_logprobs[0] is None, what
            for j in range(1, n):
                check_entry(seq.prompt_logprobs[j], expected[j - 1], seq.prompt_ids[j],
                            seq.params.prompt_logprobs, f"{what} prompt token {j}")
        if seq.params.logprobs is None:
            assert seq.output_logprobs == []
        else:
            assert len(seq.output_logprobs) == len(seq.output_ids), what
            for i, token in enumerate(seq.output_ids):
                check_entry(seq.output_logprobs[i], expected[n - 1 + i], token, seq.params.logprobs,
                            f"{what} output token {i}")
    assert any(s.params.max_new_tokens == 0 for s in seqs) and any(len(s.prompt_ids) > 7 for s in seqs)


def test_a_prefix_that_breaks_the_logits_fails_only_its_request(tokenizer, tmp_path):
    """A prefix with huge values (x 1e38: the larger ones overflow to infinity, as a bad in-memory copy
    could) makes that row's logits NaN; that request fails with a message, and its neighbours in the same
    steps still equal PEFT."""
    import dataclasses

    base = wrap_model(tiny_model("llama"), tokenizer, "llama")
    good = make_adapter(base, "prefix", 4, tmp_path, seed=1)
    broken = make_adapter(base, "prefix", 3, tmp_path, seed=2)
    poisoned = dataclasses.replace(broken.prefix, tensor=broken.prefix.tensor * 1e38)
    client = LocalEngineClient(base, EngineConfig(max_batch_size=4, max_step_tokens=64))
    rng = random.Random(0)
    seqs = [RequestState([rng.randrange(VOCAB) for _ in range(6)],
                     SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=t, seed=3), prefix)
            for prefix, t in ((good.prefix, 0.0), (poisoned, 0.0), (None, 0.7), (poisoned, 0.9))]
    for seq in seqs:
        client.submit(seq)
    client.run_until_idle()
    for seq in (seqs[1], seqs[3]):
        assert seq.finish_reason.value == "error" and "non-finite" in seq.error, seq.error
    assert seqs[0].finish_reason.value == seqs[2].finish_reason.value == "length"
    from tests.helpers.support import assert_oracle_tokens
    assert_oracle_tokens(good.oracle, seqs[0].prompt_ids, seqs[0].output_ids, "good neighbour")
    assert client.engine.num_running == 0
