"""Runs the base model over the batch: one packed forward per step, decode tokens and prefill chunks together.

The runner owns tensors and never queues: row ``i`` of the cache belongs to ``rows[i]``, a list the engine
keeps in step through :meth:`step` (which admits) and :meth:`release`.

Rows are ordered ``[decoding rows | prefilling rows]``: a step gives every decoding row one token and then
spends what is left of the step's token budget on prefill chunks, in row order, so at most the last row is
part-way through its prefill when the step ends. Every row before it has a next token to sample, which is
why the sampled rows of a step are always rows ``0..k-1``.

Position ids follow PEFT, so outputs match it token for token, and each equals the token's cache column:
- prefix-tuning rows: the prefix occupies positions ``0..P-1`` (its keys are stored un-rotated, as PEFT
  stores them), so prompt token ``j`` gets position ``P + j``;
- soft-prompt rows: virtual tokens are ordinary inputs at positions ``0..P-1`` and prompt token ``j``
  gets ``P + j``;
- base rows: ``j``.

Prompt log-probabilities come from the same forward: for a row that asks for them, the logits of its prompt
positions are kept too (``logits_to_keep`` lists them after the next-token positions), chunk by chunk as its
prefill proceeds, so a long prompt's scores arrive over several steps and no second pass is ever run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.attention import PackedBatch, packed, use_packed_attention
from server.engine.kv_cache import SlotKVCache
from server.engine.model import BaseModel
from server.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class PromptLogits:
    """Logits of some prompt positions of one row: ``logits[i]`` predicts prompt token ``first + i``."""

    seq: Sequence
    first: int  # index into seq.prompt_ids of the token the first row of logits predicts (>= 1)
    logits: torch.Tensor  # [c, V]


@dataclass(frozen=True, slots=True)
class StepLogits:
    next: torch.Tensor  # [k, V]: next-token logits of rows 0..k-1
    prompt: list[PromptLogits]  # for rows that asked for prompt logprobs and prefilled in this step


def num_decoding(rows: list[Sequence]) -> int:
    """Rows whose prefill is complete; they are rows ``0..num_decoding-1``."""
    n = len(rows)
    while n and not rows[n - 1].prefilled:
        n -= 1
    return n


def prefill_budget(rows: list[Sequence], step_tokens: int) -> int:
    """Tokens of a ``step_tokens`` step left for rows that join now, after decoding and unfinished rows."""
    decoding = num_decoding(rows)
    budget = step_tokens - decoding
    for seq in rows[decoding:]:
        budget -= min(seq.input_len - seq.num_computed, max(budget, 0))
    return max(budget, 0)


class ModelRunner:
    def __init__(self, base: BaseModel, max_slots: int):
        self.base = base
        self.model = base.model
        use_packed_attention(self.model)
        shape = base.shape
        self.cache = SlotKVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, base.dtype,
                                 base.device, max_slots)
        self.embed = self.model.get_input_embeddings()
        self.rows: list[Sequence] = []
        # transformers builds no mask of its own when handed a 4-D one; packed_attention masks per row itself.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=base.device)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_decoding(self) -> int:
        """Rows whose prefill is complete; they are rows ``0..num_decoding-1``."""
        return num_decoding(self.rows)

    def prefill_budget(self, step_tokens: int) -> int:
        return prefill_budget(self.rows, step_tokens)

    # -- one step -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, joining: list[Sequence], step_tokens: int) -> StepLogits:
        """Admit ``joining`` as new rows, then run one forward of at most ``step_tokens`` tokens.

        Returns next-token logits ``[k, V]`` for rows ``0..k-1`` (the decoding rows and the rows whose prefill
        completed in this step), and the prompt positions' logits of rows that want prompt logprobs.
        """
        cache = self.cache
        if joining:
            cache.reserve(self.num_rows + len(joining), max(seq.total_len for seq in self.rows + joining))
            for seq in joining:
                row = cache.add_row()
                seq.num_computed = 0
                if seq.num_prefix_kv:
                    assert seq.prefix is not None, "prefix key/values come from a prefix"
                    cache.write_prefix(row, seq.prefix.tensor)
                self.rows.append(seq)

        d = self.num_decoding
        ids: list[int] = [seq.output_ids[-1] for seq in self.rows[:d]]
        rows: list[int] = list(range(d))
        cols: list[int] = cache.lengths[:d]
        keep: list[int] = list(range(d))  # packed indices whose logits are wanted
        soft: list[tuple[int, torch.Tensor]] = []  # (packed index, virtual-token embeddings) to splice in
        chunks: list[tuple[int, int]] = []  # per prefilling row: (first packed index, chunk length)
        scored: list[tuple[Sequence, int, int]] = []  # (row, first prompt token predicted, how many)
        score_keep: list[int] = []  # packed indices of those prompt positions, after ``keep``
        budget = step_tokens - d
        for row in range(d, self.num_rows):
            seq = self.rows[row]
            start = seq.num_computed
            count = min(seq.input_len - start, budget)
            assert count > 0, "every prefilling row gets a chunk (the scheduler admits within the budget)"
            budget -= count
            first = len(ids)
            n_soft = seq.num_soft_tokens
            if start < n_soft:
                assert seq.prefix is not None, "soft tokens come from a prefix"
                soft.append((first, seq.prefix.tensor[start : min(n_soft, start + count)]))
            ids += [seq.prompt_ids[i - n_soft] if i >= n_soft else 0 for i in range(start, start + count)]
            rows += [row] * count
            cols += range(cache.lengths[row], cache.lengths[row] + count)
            chunks.append((first, count))
            if start + count == seq.input_len:
                keep.append(first + count - 1)
            if seq.params.prompt_logprobs is not None:
                # input position i predicts input i + 1: prompt tokens 1.. come from positions n_soft..
                lo, hi = max(start, n_soft), min(start + count, seq.input_len - 1)
                if lo < hi:
                    scored.append((seq, lo + 1 - n_soft, hi - lo))
                    score_keep += range(first + lo - start, first + hi - start)

        batch = self._layout(rows, cols, d, chunks)
        device = self.base.device
        embeds = self.embed(torch.tensor(ids, dtype=torch.long, device=device))[None]  # [1, T, H]
        for first, vectors in soft:
            embeds[0, first : first + vectors.shape[0]] = vectors
        with packed(batch):
            out = self.model(
                inputs_embeds=embeds,
                attention_mask=self._no_mask,
                position_ids=batch.cols[None],
                cache=cache.view(batch),
                use_cache=True,
                logits_to_keep=torch.tensor(keep + score_keep, dtype=torch.long, device=device),
            )
        for row in range(d):
            cache.lengths[row] += 1
        for (_, count), seq, row in zip(chunks, self.rows[d:], range(d, self.num_rows)):
            cache.lengths[row] += count
            seq.num_computed += count
        logits = out.logits[0]  # [len(keep) + len(score_keep), V]
        prompt, at = [], len(keep)
        for seq, first, n in scored:
            prompt.append(PromptLogits(seq, first, logits[at: at + n]))
            at += n
        return StepLogits(logits[: len(keep)], prompt)

    def _layout(self, rows: list[int], cols: list[int], d: int, chunks: list[tuple[int, int]]) -> PackedBatch:
        # Widths come from the host-side lists, so building the layout never waits for the device.
        device = self.base.device
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        cols_t = torch.tensor(cols, dtype=torch.long, device=device)
        decode_mask = None
        if d:
            lengths = cols_t[:d] + 1  # after this step's token
            width = max(cols[:d]) + 1
            decode_mask = (torch.arange(width, device=device)[None] < lengths[:, None])[:, None, None]
        gather = take = prefill_mask = None
        if chunks:
            first = torch.tensor([c[0] for c in chunks], dtype=torch.long, device=device)  # [m]
            count = torch.tensor([c[1] for c in chunks], dtype=torch.long, device=device)  # [m]
            s = max(c[1] for c in chunks)
            i = torch.arange(s, device=device)  # [S]
            offset = torch.minimum(i[None], count[:, None] - 1)  # [m, S]: padding repeats the last query
            gather = first[:, None] + offset
            take = torch.tensor([j * s + k for j, (_, c) in enumerate(chunks) for k in range(c)],
                                dtype=torch.long, device=device)
            query_cols = cols_t[gather]  # [m, S]
            width = max(cols[d:]) + 1
            prefill_mask = (torch.arange(width, device=device)[None, None] <= query_cols[..., None])[:, None]
        return PackedBatch(rows_t, cols_t, d, decode_mask, slice(d, d + len(chunks)), gather, take,
                           prefill_mask)

    # -- leaving ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def release(self, row: int) -> None:
        """Free ``row``, keeping rows dense and ordered ``[decoding | prefilling]``.

        A decoding row is overwritten by the last decoding row, whose place the (at most one) unfinished row
        after it takes; a prefilling row can only be the last row.
        """
        cache, last = self.cache, self.num_rows - 1
        d = self.num_decoding
        if row < d:
            for src, dst in ((d - 1, row), (last, d - 1)):
                if src != dst:
                    cache.move_row(src, dst)
                    self.rows[dst] = self.rows[src]
        else:
            assert row == last, "only the last row can be part-way through its prefill"
        cache.pop_row()
        self.rows.pop()

    @torch.inference_mode()
    def scrub(self, row: int) -> None:
        """Zero ``row``'s keys and values, for a row that failed with non-finite values. Rows reuse slots and
        mask the columns past their length, but a masked column still enters attention as weight 0 x value,
        and 0 x inf is NaN: a stale infinity would poison whichever request takes the slot next."""
        for buf in (*self.cache.keys, *self.cache.values):
            buf[row].zero_()

    def reset(self) -> None:
        """Drop every row (after a failed forward the cache contents are not trusted, so they are zeroed)."""
        for row in range(self.num_rows):
            self.scrub(row)
        while self.rows:
            self.release(self.num_rows - 1)
