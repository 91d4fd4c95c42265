"""The first structured request pays for nothing the server could have done before it: no torch.compile on
the sampling path (llguidance's bitmask kernel is one: its first call compiled C++ for 19-81 s, and failed
where no compiler is installed), and the token table built by ``Grammars.warm_up`` at the engine's start."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from server.engine.grammar import Grammars, apply_token_mask
from server.engine.sampling import Sampler
from server.engine.sequence import SamplingParams, Sequence

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                     "required": ["name", "age"]})


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (every new trace and recompile counts)."""
    return counters["stats"]["unique_graphs"]


def guided_steps(grammars: Grammars, batch_sizes: tuple[int, ...]) -> list[list[int]]:
    """One sampling step of ``n`` JSON-schema rows for each ``n``; each step's tokens."""
    vocab = grammars.vocab_size
    sampler = Sampler(vocab, torch.device("cpu"), frozenset({2}), grammars)
    steps = []
    for n in batch_sizes:
        seqs = [Sequence([5, 6], SamplingParams(max_new_tokens=4, structured=("json_schema", SCHEMA)))
                for _ in range(n)]
        for seq in seqs:
            sampler.admit(seq)
        sampler.prefetch_masks(seqs)
        steps.append(sampler.sample(torch.randn(n, vocab, generator=torch.Generator().manual_seed(n)),
                                    seqs).tokens)
        for seq in seqs:
            sampler.release(seq)
    return steps


@pytest.fixture
def fresh_dynamo():
    """Dynamo with nothing compiled, as in a new process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_structured_sampling_compiles_nothing(tokenizer, fresh_dynamo):
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    before = compiled_graphs()
    steps = guided_steps(grammars, (1, 3, 1, 8))
    assert compiled_graphs() == before, "a guided sampling step ran torch.compile"
    first = {tokenizer.decode([tokens[0]]) for tokens in steps}
    assert first and all(text.startswith("{") for text in first), first  # the masks were applied


def test_the_warm_up_builds_the_token_table_and_follows_a_schema(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    assert grammars._ll_tokenizer is None, "built on first use, else"
    grammars.warm_up("cpu")
    table = grammars._ll_tokenizer
    assert table is not None
    guided_steps(grammars, (2,))
    assert grammars._ll_tokenizer is table, "the first request reuses the warm-up's table"


@pytest.mark.parametrize("vocab", [32, 100, 256, 49152])
def test_token_mask_disallows_exactly_the_clear_bits(vocab):
    """Against the layout's definition, token by token: token t is allowed iff bit t % 32 of word t // 32."""
    rng = random.Random(vocab)
    rows, words = 3, (vocab + 31) // 32
    mask = torch.tensor([[rng.getrandbits(32) - (1 << 31) for _ in range(words)] for _ in range(rows)],
                        dtype=torch.int32)
    mask[1] = -1  # every token allowed
    mask[2, : words // 2] = 0  # the first half of the words: none
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    masked = logits.clone()
    apply_token_mask(masked, mask)
    for r in range(rows):
        for t in range(vocab):
            allowed = (int(mask[r, t // 32]) >> (t % 32)) & 1
            assert masked[r, t] == (logits[r, t] if allowed else float("-inf")), (r, t)
