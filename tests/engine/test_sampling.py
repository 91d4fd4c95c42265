"""The batched sampler against per-row reference formulas, and its failure isolation. No model: logits are
made up, so every case is exact and fast."""

from __future__ import annotations

import json
import math

import pytest
import torch

from server.engine.grammar import Grammars, InvalidGrammar
from server.engine.sampling import Sampler
from server.engine.sequence import SamplingParams, Sequence

V = 64
EOS = 2


def make_sampler(grammars=None) -> Sampler:
    return Sampler(V, torch.device("cpu"), frozenset({EOS}), grammars)


def admitted(sampler: Sampler, *seqs: Sequence) -> list[Sequence]:
    for seq in seqs:
        sampler.admit(seq)
    return list(seqs)


def reference_penalised(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row, one token id at a time: repetition (prompt + output ids), then frequency and presence."""
    out, p = logits.clone(), seq.params
    for t in set(seq.prompt_ids) | set(seq.output_ids) if p.repetition_penalty != 1 else ():
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(seq.output_ids):
        out[t] -= p.frequency_penalty * seq.output_ids.count(t) + p.presence_penalty
    return out


def test_penalties_and_bias_match_the_per_row_formulas():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(repetition_penalty=1.7),
              SamplingParams(frequency_penalty=0.9, presence_penalty=1.3),
              SamplingParams(repetition_penalty=0.6, frequency_penalty=-0.5, presence_penalty=0.4),
              SamplingParams(logit_bias=((5, 30.0), (7, -100.0)))]
    seqs = [Sequence([1, 5, 9, 9], p) for p in params]
    for seq in seqs:
        seq.output_ids += [9, 11, 11, 11, 40]
    sampler = make_sampler()
    admitted(sampler, *seqs)
    processed = sampler._process(logits, seqs, {})
    for i in range(3):
        torch.testing.assert_close(processed[i], reference_penalised(logits[i], seqs[i]))
    expected = logits[3].clone()
    expected[5] += 30
    expected[7] -= 100
    torch.testing.assert_close(processed[3], expected)
    assert sampler.sample(logits, seqs).tokens[3] == 5  # greedy rows take the processed argmax
    assert torch.equal(logits, logits.clone())  # the caller's logits are untouched


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, V)
    logits[:, EOS] = 50.0
    logits[:, 17] = 40.0
    logits[:, 3] = 30.0
    params = SamplingParams(min_tokens=2, stop_token_ids=(17,))
    young, grown = Sequence([1], params), Sequence([1], params)
    grown.output_ids += [4, 4]
    sampler = make_sampler()
    assert sampler.sample(logits, admitted(sampler, young, grown)).tokens == [3, EOS]


def test_seeded_draws_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, V)
    kinds = [SamplingParams(temperature=0.9, seed=11), SamplingParams(temperature=1.3, top_k=7, seed=12),
             SamplingParams(temperature=0.7, top_p=0.8, seed=13), SamplingParams(),
             SamplingParams(top_p=0.5, top_k=3, temperature=1.0, seed=14)]

    def run(order: list[int], steps: int = 12) -> dict[int, list[int]]:
        sampler, seqs = make_sampler(), {i: Sequence([1], kinds[i]) for i in order}
        admitted(sampler, *seqs.values())
        out = {i: [] for i in order}
        for _ in range(steps):
            tokens = sampler.sample(logits[order], [seqs[i] for i in order]).tokens
            for i, t in zip(order, tokens):
                out[i].append(t)
        return out

    together = run([0, 1, 2, 3, 4])
    assert together == {**run([4, 2, 0]), **run([3, 1])}
    assert len(set(together[0])) > 1  # really sampled
    top7 = set(torch.topk(logits[1] / 1.3, 7).indices.tolist())
    assert set(together[1]) <= top7
    assert set(together[4]) <= set(torch.topk(logits[4], 3).indices.tolist())


def test_draws_follow_the_distribution():
    logits = torch.full((1, V), -1e4)
    logits[0, :3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    sampler = make_sampler()
    [seq] = admitted(sampler, Sequence([1], SamplingParams(temperature=1.0, seed=0)))
    counts = torch.bincount(torch.tensor([sampler.sample(logits, [seq]).tokens[0] for _ in range(3000)]),
                            minlength=V)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3] / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 7e-188, 1e-6])
def test_tiny_temperatures_are_greedy(temperature):
    params = SamplingParams(temperature=temperature, seed=3)
    assert params.greedy
    logits = torch.randn(1, V) * 100
    sampler = make_sampler()
    result = sampler.sample(logits, admitted(sampler, Sequence([1], params)))
    assert result.tokens == [int(logits.argmax())] and not result.errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=bad)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_row_with_non_finite_logits_fails_alone(poison):
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    logits[1, 9] = poison
    sampler = make_sampler()
    seqs = admitted(sampler, *(Sequence([1], SamplingParams(temperature=t, seed=1, logprobs=2))
                               for t in (0.0, 0.8, 0.8)))
    result = sampler.sample(logits, seqs)
    assert set(result.errors) == {1} and "non-finite" in result.errors[1]
    assert result.tokens[0] == int(logits[0].argmax())
    assert set(result.logprobs) == {0, 2} and all(math.isfinite(result.logprobs[i][0]) for i in (0, 2))


def test_an_exception_in_one_row_fails_that_row_only(monkeypatch):
    sampler = make_sampler()
    seqs = admitted(sampler, *(Sequence([1], SamplingParams(temperature=1.0, seed=i)) for i in range(3)))
    del sampler._rows[seqs[2].id]  # its state is gone: looking it up raises inside the batched draw
    result = sampler.sample(torch.randn(3, V), seqs)
    assert set(result.errors) == {2} and "KeyError" in result.errors[2]


def test_biases_that_leave_every_token_equal_still_sample_and_a_masked_out_row_fails():
    sampler = make_sampler()
    params = SamplingParams(logit_bias=tuple((t, -100.0) for t in range(V)), min_tokens=1)
    logits = torch.zeros(2, V)
    logits[0] = float("-inf")
    logits[0, EOS] = 0.0  # only EOS, which min_tokens forbids: nothing is left
    both = admitted(sampler, Sequence([1], SamplingParams(min_tokens=1)), Sequence([1], params))
    result = sampler.sample(logits, both)
    assert set(result.errors) == {0}
    assert result.tokens[1] != EOS


# ---------------------------------------------------------------------------------------------------------
# Grammars on the real tokenizer


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def test_grammar_masks_force_a_schema_even_from_random_logits(grammars, tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["name", "n", "ok"], "additionalProperties": False}
    vocab = len(tokenizer)
    sampler = Sampler(vocab, torch.device("cpu"), frozenset({tokenizer.eos_token_id}), grammars)
    torch.manual_seed(0)
    seqs = [Sequence([1],
                     SamplingParams(temperature=1.0, seed=s, structured=("json_schema", json.dumps(schema))))
            for s in range(3)]
    seqs.append(Sequence([1],
                         SamplingParams(temperature=1.0, seed=9, structured=("choice", '["yes", "no"]'))))
    admitted(sampler, *seqs)
    live = list(seqs)
    for step in range(60):
        if step % 2:  # odd steps: masks filled ahead on the helper thread, as the engine does
            sampler.prefetch_masks(live)
        result = sampler.sample(torch.randn(len(live), vocab), live)
        assert not result.errors
        for seq, token in zip(live, result.tokens):
            seq.output_ids.append(token)
        live = [s for s in live if s.output_ids[-1] != tokenizer.eos_token_id]
        if not live:
            break
    assert not live, "a guided row never reached EOS"
    for seq in seqs[:3]:
        jsonschema.validate(json.loads(tokenizer.decode(seq.output_ids, skip_special_tokens=True)), schema)
    assert tokenizer.decode(seqs[3].output_ids, skip_special_tokens=True) in ("yes", "no")


def test_invalid_grammars_are_refused_with_a_reason(grammars):
    with pytest.raises(InvalidGrammar, match="json_schema"):
        grammars.check(("json_schema", '{"type": 5}'))
    with pytest.raises(InvalidGrammar):
        grammars.check(("regex", "(unclosed"))
    grammars.check(("regex", "[a-z]+"))
