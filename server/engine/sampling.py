"""Choosing each row's next token under its own sampling parameters."""

from __future__ import annotations

import torch

from server.engine.sequence import SamplingParams, Sequence


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request draws the same numbers whatever shares its batch."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [V] float32. Temperature, then top-k, then top-p (nucleus), then one draw."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [n, V] for the n rows of ``seqs``, in order. Greedy rows share one argmax."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[i] = sample_row(logits[i], seq.params, seq.generator)
    return tokens
