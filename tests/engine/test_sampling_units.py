"""One row at a time through the Sampler: greedy, the temperature -> greedy limit, top-k and top-p cuts,
penalties and bias, and seeded draws, each against an exact expected outcome. Made-up logits, no model."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.sampling import Sampler, _invert
from server.engine.sequence import SamplingParams, Sequence

V = 8
EOS = 7


def sample(logits: list[float], params: SamplingParams, output_ids=(), prompt=(5, 6)) -> int:
    sampler = Sampler(V, torch.device("cpu"), frozenset({EOS}))
    seq = Sequence(list(prompt), params)
    seq.output_ids.extend(output_ids)
    sampler.admit(seq)
    result = sampler.sample(torch.as_tensor([logits], dtype=torch.float32), [seq])
    assert result.errors == {}
    return result.tokens[0]


def draws(logits: list[float], seeds: range, **params) -> list[int]:
    return [sample(logits, SamplingParams(temperature=1.0, seed=seed, **params)) for seed in seeds]


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) if p else -math.inf for p in probs]


def test_invert_takes_the_first_column_whose_cumulative_mass_passes_the_draw():
    probs = torch.tensor([[0.2, 0.3, 0.5]] * 4)
    uniform = torch.tensor([0.0, 0.19, 0.2, 0.999], dtype=torch.float64)
    assert _invert(probs, uniform).tolist() == [0, 0, 1, 2]
    # rows need not sum to one, and a zero-probability column is never chosen
    assert _invert(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([0.5], dtype=torch.float64)).tolist() == [2]
    assert _invert(torch.tensor([[0.5, 0.0, 0.5]]), torch.tensor([0.5], dtype=torch.float64)).tolist() == [2]


def test_greedy_takes_the_argmax():
    logits = [0.1, 2.0, -1.0, 3.5, 3.4, 0.0, 0.0, 0.0]
    assert sample(logits, SamplingParams()) == 3
    assert sample(logits, SamplingParams(temperature=1.5, top_k=1, seed=0)) == 3  # top_k=1 is greedy too


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 0.0])
def test_temperatures_below_the_limit_are_greedy_even_on_near_ties(temperature):
    logits = [0.0, 5.0, 5.0 - 1e-4, 0, 0, 0, 0, 0]
    assert all(sample(logits, SamplingParams(temperature=temperature, seed=s)) == 1 for s in range(20))


def test_a_draw_inverts_the_distribution_at_the_requests_own_uniform():
    probs = [0.05, 0.1, 0.15, 0.2, 0.25, 0.1, 0.1, 0.05]
    cdf = [sum(probs[: i + 1]) for i in range(V)]
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        u = float(torch.rand((), generator=generator, dtype=torch.float64))  # the sampler's first number
        expected = next(i for i, c in enumerate(cdf) if c > u)
        assert draws(log_probs(probs), range(seed, seed + 1)) == [expected], (seed, u)


def test_top_k_draws_only_the_k_best():
    logits = [0.0, 1.0, 0.5, 1.2, 0.9, 0.1, 0.2, 0.3]  # best first: 3, 1, 4, 2
    seen = set(draws(logits, range(200), top_k=3))
    assert seen == {3, 1, 4}


@pytest.mark.parametrize(("top_p", "kept"), [
    (1.0, {0, 1, 2, 3}),
    (0.9, {0, 1, 2}),  # 0.5 + 0.3 = 0.8 < 0.9: the third token is still needed
    (0.8, {0, 1}),  # 0.5 + 0.3 reaches 0.8: the third is dropped
    (0.6, {0, 1}),
    (0.5, {0}),  # the best token alone reaches it
    (1e-9, {0}),  # the best token always stays
])
def test_top_p_keeps_the_fewest_best_tokens_that_reach_it(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05, 0.0, 0.0, 0.0, 0.0]
    assert set(draws(log_probs(probs), range(300), top_p=top_p)) == kept


def test_each_row_keeps_its_own_top_k_in_a_shared_batch():
    logits = torch.tensor([[0.0, 1.0, 0.5, 1.2, 0.9, 0.1, 0.2, 0.3]] * 2)  # best first: 3, 1, 4, 2, 7
    seen: list[set[int]] = [set(), set()]
    for seed in range(200):
        sampler = Sampler(V, torch.device("cpu"), frozenset({EOS}))
        seqs = [Sequence([5], SamplingParams(temperature=1.0, top_k=k, seed=seed)) for k in (2, 5)]
        for seq in seqs:
            sampler.admit(seq)
        for row, token in enumerate(sampler.sample(logits, seqs).tokens):
            seen[row].add(token)
    assert seen == [{3, 1}, {3, 1, 4, 2, 7}]


def test_top_k_then_top_p():
    probs = [0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]
    # top_k=2 leaves 0.4 / 0.7 and 0.3 / 0.7; top_p=0.5 is reached by the first alone
    assert set(draws(log_probs(probs), range(100), top_k=2, top_p=0.5)) == {0}
    assert set(draws(log_probs(probs), range(200), top_k=3, top_p=0.95)) == {0, 1, 2}


def test_penalties_and_bias_move_the_greedy_choice():
    logits = [0.0, 2.0, 1.8, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert sample(logits, SamplingParams(), output_ids=[1]) == 1
    assert sample(logits, SamplingParams(presence_penalty=0.3), output_ids=[1]) == 2  # 1.7 < 1.8
    assert sample(logits, SamplingParams(frequency_penalty=0.1), output_ids=[1]) == 1  # 1.9 > 1.8
    assert sample(logits, SamplingParams(frequency_penalty=0.1), output_ids=[1, 1, 1]) == 2  # 1.7
    assert sample(logits, SamplingParams(repetition_penalty=1.2), output_ids=[1]) == 2  # 2 / 1.2
    # repetition counts the prompt's ids too: both are divided, and 2 / 1.2 > 1.8 / 1.2
    assert sample(logits, SamplingParams(repetition_penalty=1.2), output_ids=[1], prompt=[2]) == 1
    assert sample(logits, SamplingParams(presence_penalty=0.3), prompt=[1]) == 1  # presence: output only
    assert sample(logits, SamplingParams(logit_bias=((4, 2.5),))) == 4


def test_min_tokens_masks_eos_until_reached():
    logits = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]
    assert sample(logits, SamplingParams(min_tokens=2), output_ids=[3]) == 0  # EOS masked, a tie: lowest id
    assert sample(logits, SamplingParams(min_tokens=2), output_ids=[3, 3]) == EOS


def test_seeded_draws_repeat_and_depend_on_the_seed():
    logits = torch.zeros(V)  # uniform: every token equally likely

    def run(seed: int) -> list[int]:
        sampler = Sampler(V, torch.device("cpu"), frozenset({EOS}))
        seq = Sequence([1], SamplingParams(temperature=1.0, seed=seed))
        sampler.admit(seq)
        out = []
        for _ in range(24):
            out.append(sampler.sample(logits[None], [seq]).tokens[0])
            seq.output_ids.append(out[-1])
        return out

    assert run(11) == run(11)
    assert run(11) != run(12)
    assert len(set(run(11))) > 1  # the generator moves on from step to step
