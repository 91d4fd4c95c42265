"""Runs the base model over a step's plan: one packed forward, decode tokens and prefill chunks together.

The runner owns tensors and never queues: the scheduler (:mod:`server.engine.scheduler`) decides which
sequences compute how many tokens and has already taken their blocks; the runner lays the step out
(:class:`~server.engine.attention.PackedBatch`), runs the model once, and returns the logits to sample.

Packed order: decoding rows first, sorted by length and cut into groups of similar length (one attention call
each, so a short row never pays for a long neighbour's width), then one prefill chunk per prefilling row.

Position ids follow PEFT, so outputs match it token for token:
- prefix-tuning rows: the prefix occupies positions ``0..P-1`` (its keys are stored un-rotated, as PEFT
  stores them, in blocks of the task shared by all its rows), so the row's token ``i`` gets position
  ``P + i``;
- soft-prompt rows: virtual tokens are ordinary inputs at positions ``0..P-1`` and prompt token ``j``
  gets ``P + j``;
- base rows: ``i``.
Attention gathers a row's keys as [its task's prefix | its own tokens], so a key's index is its position.

Prompt log-probabilities come from the same forward: for a row that asks for them, the logits of its prompt
positions are kept too (``logits_to_keep`` lists them after the next-token positions), chunk by chunk as its
prefill proceeds, so a long prompt's scores arrive over several steps and no second pass is ever run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine import cpu_kernels
from server.engine.attention import DecodeGroup, PackedBatch, PrefillChunk, packed, use_packed_attention
from server.engine.cpu_linear import pack_linears
from server.engine.kv_cache import PagedKVCache
from server.engine.llama_stack import LlamaStack
from server.engine.model import BaseModel
from server.engine.scheduler import StepPlan
from server.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class PromptLogits:
    """Logits of some prompt positions of one row: ``logits[i]`` predicts prompt token ``first + i``."""

    seq: Sequence
    first: int  # index into seq.prompt_ids of the token the first row of logits predicts (>= 1)
    logits: torch.Tensor  # [c, V]


@dataclass(frozen=True, slots=True)
class StepLogits:
    next: torch.Tensor  # [k, V]: next-token logits of seqs[0..k-1]
    seqs: list[Sequence]  # the rows that sample in this step: decoding ones, then completed prefills
    prompt: list[PromptLogits]  # for rows that asked for prompt logprobs and prefilled in this step


@dataclass(slots=True)
class _PackedInputs:
    """One step's packed inputs as they are laid out, row after row (``T`` tokens in all)."""

    ids: list[int] = field(default_factory=list)  # [T] token ids
    slots: list[int] = field(default_factory=list)  # [T] the cache slot each token's key/value is written to
    positions: list[int] = field(default_factory=list)  # [T] position ids (PEFT's)
    keep: list[int] = field(default_factory=list)  # packed indices whose next-token logits are sampled
    sampled: list[Sequence] = field(default_factory=list)  # their rows, in that order
    soft: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (index, virtual-token embeddings)
    scored: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (row, first prompt token, count)
    score_keep: list[int] = field(default_factory=list)  # packed indices of those prompt positions


# Decoding rows share one attention call while the widest is at most this much wider than the narrowest
# (padding costs gathered bytes and attention work; another call costs per-layer overhead).
GROUP_GROWTH, GROUP_SLACK = 1.5, 64


# A decoding row at least this wide, alone in its group, reads its runs of at least VIEW_MIN_RUN consecutive
# slots as views of the pool instead of gathering them (merged_attention.attend_runs; measured in
# docs/benchmarks.md: gathering a 6,000-slot row cost as much as attending it).
VIEW_MIN_WIDTH, VIEW_MIN_RUN = 1024, 256


def slot_runs(row: list[int], min_run: int) -> tuple[tuple[tuple[int, int], ...], list[int]]:
    """``row``'s runs of at least ``min_run`` consecutive slots as (first slot, count); the other slots."""
    runs, rest, start = [], [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[i - 1] + 1:
            if i - start >= min_run:
                runs.append((row[start], i - start))
            else:
                rest += row[start:i]
            start = i
    return tuple(runs), rest


def decode_groups(widths: list[int]) -> list[tuple[int, int]]:
    """Cut rows sorted by ``widths`` (ascending) into ``[start, stop)`` runs of similar width."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] > widths[start] * GROUP_GROWTH + GROUP_SLACK:
            groups.append((start, i))
            start = i
    return groups


class ModelRunner:
    def __init__(self, base: BaseModel, cache: PagedKVCache):
        self.base = base
        self.model = base.model
        use_packed_attention(self.model)
        # Llama-shaped families: the same arithmetic without transformers' per-module Python (None: others);
        # built first, so that pack_linears skips the projections it fuses
        self.stack = LlamaStack.build(self.model)
        pack_linears(self.model)  # bfloat16 on CPU: oneDNN-prepacked weights (a no-op otherwise)
        if torch.device(base.device).type == "cpu":
            cpu_kernels.library()  # built at start (about a second, once a machine), not in a first request
        self.cache = cache
        self.blocks = cache.manager
        self.embed = self.model.get_input_embeddings()
        # transformers builds no mask of its own when handed a 4-D one; packed_attention masks per row itself.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=base.device)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepLogits:
        """Run one forward over ``plan``; returns next-token logits for the decoding rows and the rows whose
        prefill completes in this step (in :attr:`StepLogits.seqs` order), and the prompt positions' logits
        of rows that want prompt logprobs."""
        self.cache.write_pending_prefixes()
        device = self.base.device
        step = _PackedInputs()
        decode = sorted(plan.decode, key=lambda seq: seq.num_prefix_kv + seq.num_computed)
        groups = self._lay_out_decode(step, decode)
        chunks = [self._lay_out_prefill(step, seq, count) for seq, count in plan.prefill]

        batch = PackedBatch(torch.tensor(step.slots, dtype=torch.long, device=device), tuple(groups),
                            tuple(chunks))
        embeds = self.embed(torch.tensor(step.ids, dtype=torch.long, device=device))[None]  # [1, T, H]
        for first, vectors in step.soft:
            embeds[0, first: first + vectors.shape[0]] = vectors
        positions = torch.tensor(step.positions, dtype=torch.long, device=device)
        keep = torch.tensor(step.keep + step.score_keep, dtype=torch.long, device=device)
        logits = self.forward(embeds, positions, batch, keep)
        for seq in decode:
            seq.num_computed += 1
            self.blocks.computed(seq)
        for seq, count in plan.prefill:
            seq.num_computed += count
            self.blocks.computed(seq)
        prompt, at = [], len(step.keep)
        for seq, first, n in step.scored:
            prompt.append(PromptLogits(seq, first, logits[at: at + n]))
            at += n
        return StepLogits(logits[: len(step.keep)], step.sampled, prompt)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, batch: PackedBatch,
                keep: torch.Tensor) -> torch.Tensor:
        """The model over one laid-out step: embeds [1, T, H], positions [T], keep [K] (packed indices whose
        logits are wanted) -> [K, V]. The one place the model runs (the bench times it here)."""
        with packed(batch):
            if self.stack is not None:
                return self.stack(embeds[0], positions, batch, self.cache.keys, self.cache.values, keep)
            out = self.model(inputs_embeds=embeds, attention_mask=self._no_mask, position_ids=positions[None],
                             cache=self.cache.view(batch), use_cache=True, logits_to_keep=keep)
            return out.logits[0]

    def _lay_out_decode(self, step: _PackedInputs, decode: list[Sequence]) -> list[DecodeGroup]:
        """Append each decoding row's one token (rows sorted by width); one group per run of similar widths,
        its gather ``[rows, W]`` of slot indices (short rows padded with their last slot, masked out)."""
        device, groups = self.base.device, []
        widths = [seq.num_prefix_kv + seq.num_computed + 1 for seq in decode]
        for a, b in decode_groups(widths):
            gather, lengths = [], []
            for seq in decode[a:b]:
                n = seq.num_computed
                step.ids.append(seq.token_at(n))
                own = self.blocks.slots(seq, 0, n + 1)
                step.slots.append(own[-1])
                step.positions.append(seq.num_prefix_kv + n)
                step.keep.append(len(step.ids) - 1)
                step.sampled.append(seq)
                row = self.blocks.prefix_slots(seq) + own
                lengths.append(len(row))
                gather.append(row)
            width = lengths[-1]
            gather = [row + [row[-1]] * (width - len(row)) for row in gather]
            lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
            mask = None
            if lengths[0] != width:
                mask = (torch.arange(width, device=device)[None] < lengths_t[:, None])[:, None, None]
            runs: tuple[tuple[int, int], ...] = ()
            rest = None
            # only CPU attention reads a long row's runs as views (attention.py); elsewhere it gathers
            if b - a == 1 and width >= VIEW_MIN_WIDTH and torch.device(device).type == "cpu":
                runs, others = slot_runs(gather[0], VIEW_MIN_RUN)
                rest = torch.tensor(others, dtype=torch.long, device=device) if others else None
            groups.append(DecodeGroup(a, b, torch.tensor(gather, dtype=torch.long, device=device), mask,
                                      torch.tensor(step.positions[a:b], dtype=torch.long, device=device),
                                      lengths_t, runs, rest))
        return groups

    def _lay_out_prefill(self, step: _PackedInputs, seq: Sequence, count: int) -> PrefillChunk:
        """Append ``count`` of ``seq``'s tokens from ``num_computed`` on: its chunk reads the row's slots
        ``[W]`` under a causal mask ``[count, W]`` (none when the chunk is the whole row)."""
        device = self.base.device
        start, first = seq.num_computed, len(step.ids)
        n_soft = seq.num_soft_tokens
        if start < n_soft:
            assert seq.prefix is not None, "soft tokens come from a prefix"
            step.soft.append((first, seq.prefix.tensor[start: min(n_soft, start + count)]))
        step.ids += [seq.token_at(i) for i in range(start, start + count)]
        own = self.blocks.slots(seq, 0, start + count)
        step.slots += own[start:]
        p = seq.num_prefix_kv
        chunk_positions = list(range(p + start, p + start + count))
        step.positions += chunk_positions
        row_slots = self.blocks.prefix_slots(seq) + own
        width = len(row_slots)
        pos_t = torch.tensor(chunk_positions, dtype=torch.long, device=device)
        mask = None
        if width != count:
            mask = torch.arange(width, device=device)[None] <= pos_t[:, None]  # [c, W]
        if start + count == seq.num_tokens:
            step.keep.append(first + count - 1)
            step.sampled.append(seq)
        if seq.params.prompt_logprobs is not None:
            # position i predicts token i + 1: prompt tokens 1.. come from positions n_soft..; entries
            # already sent (before a preemption) are not scored again
            lo = max(start, n_soft + seq.num_prompt_logprobs)
            hi = min(start + count, seq.input_len - 1)
            if lo < hi:
                step.scored.append((seq, lo + 1 - n_soft, hi - lo))
                step.score_keep += range(first + lo - start, first + hi - start)
        return PrefillChunk(first, first + count, torch.tensor(row_slots, dtype=torch.long, device=device),
                            mask, pos_t)
