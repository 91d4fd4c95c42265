"""Runs the base model over the batch: prefill of joining requests and one decode step for all.

The runner owns tensors and never queues: row ``i`` of the cache belongs to ``rows[i]``, a list the engine
keeps in step through :meth:`admit` / :meth:`release`.

Position ids follow PEFT, so outputs match it token for token:
- prefix-tuning rows: the prefix occupies positions ``0..P-1`` (its keys are stored un-rotated, as PEFT
  stores them), so prompt token ``j`` gets position ``P + j``;
- soft-prompt rows: virtual tokens are ordinary inputs at positions ``0..P-1`` and prompt token ``j``
  gets ``P + j``;
- base rows: ``j``.
"""

from __future__ import annotations

import torch

from server.engine.kv_cache import SlotKVCache
from server.engine.model import BaseModel
from server.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, base: BaseModel, max_slots: int):
        self.base = base
        self.model = base.model
        shape = base.shape
        self.cache = SlotKVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, base.dtype, base.device,
                                  max_slots)
        self.embed = self.model.get_input_embeddings()
        self.rows: list[Sequence] = []
        self._positions = torch.zeros(0, dtype=torch.long, device=base.device)  # [rows]: next position id
        self._last_tokens = torch.zeros(0, dtype=torch.long, device=base.device)  # [rows]: last sampled token
        self._mask_min = torch.finfo(base.dtype).min

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    # -- prefill ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prefill ``seqs`` as new rows of the running batch; returns their next-token logits [m, V]."""
        cache, device = self.cache, self.base.device
        s = max(seq.input_len for seq in seqs)  # prefill length: soft prompt + prompt, right-aligned
        p_max = max(seq.num_prefix_kv for seq in seqs)
        cache.make_room_left(s + p_max)
        end = cache.end
        write_col = end - s  # the first column the forward writes
        first_cols = [write_col - seq.num_prefix_kv if seq.num_prefix_kv else end - seq.input_len for seq in seqs]
        rows = cache.add_rows(first_cols)

        m = len(seqs)
        embeds = torch.zeros(m, s, self.base.shape.hidden_size, dtype=self.base.dtype, device=device)
        positions = torch.zeros(m, s, dtype=torch.long, device=device)
        for i, seq in enumerate(seqs):
            row = rows.start + i
            n_in, n_prompt = seq.input_len, len(seq.prompt_ids)
            ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=device)
            embeds[i, s - n_prompt :] = self.embed(ids)
            if seq.num_soft_tokens:
                embeds[i, s - n_in : s - n_prompt] = seq.prefix.tensor
            if seq.num_prefix_kv:
                cache.write_prefix(row, write_col - seq.num_prefix_kv, seq.prefix.tensor)
            first_pos = seq.num_prefix_kv
            positions[i, s - n_in :] = torch.arange(first_pos, first_pos + n_in, device=device)
            cache.valid[row, end - n_in : end] = True

        # Mask over the window [attend_from, end): a query at column q sees valid keys at columns <= q and
        # always itself, so padding queries stay finite (their keys are never valid for anyone).
        attend_from = write_col - p_max
        cols = torch.arange(attend_from, end, device=device)  # [W]
        query_cols = torch.arange(write_col, end, device=device)  # [S]
        causal = cols[None, :] <= query_cols[:, None]  # [S, W]
        allowed = cache.valid[rows, attend_from:end][:, None, :] & causal[None]  # [m, S, W]
        allowed |= (cols[None, :] == query_cols[:, None])[None]
        logits = self._forward(rows, write_col, attend_from, allowed, embeds=embeds, positions=positions)

        self.rows.extend(seqs)
        last_pos = positions[:, -1] + 1
        self._positions = torch.cat([self._positions[: rows.start], last_pos])
        self._last_tokens = torch.cat([self._last_tokens[: rows.start], torch.zeros_like(last_pos)])
        return logits

    # -- decode -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every row; returns next-token logits [n, V] in row order."""
        cache = self.cache
        cache.make_room_right(1)
        n, end = self.num_rows, cache.end
        rows = slice(0, n)
        cache.valid[rows, end] = True
        allowed = cache.valid[rows, cache.start : end + 1][:, None, :]  # [n, 1, W]
        logits = self._forward(rows, end, cache.start, allowed,
                               input_ids=self._last_tokens[:n, None], positions=self._positions[:n, None])
        self._positions[:n] += 1
        return logits

    @torch.inference_mode()
    def set_last_tokens(self, tokens: list[int]) -> None:
        """Record the tokens just sampled for rows ``0..len(tokens)-1`` (the next decode's inputs)."""
        n = len(tokens)
        self._last_tokens[:n] = torch.tensor(tokens, dtype=torch.long, device=self._last_tokens.device)

    def _forward(self, rows: slice, write_col: int, attend_from: int, allowed: torch.Tensor, *,
                 positions: torch.Tensor, embeds: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor:
        # allowed: [rows, S, W] bool -> additive mask [rows, 1, S, W]; a finite minimum, never -inf, so a
        # fully masked query cannot produce NaN.
        mask = torch.zeros(allowed.shape, dtype=self.base.dtype, device=allowed.device)
        mask.masked_fill_(~allowed, self._mask_min)
        out = self.model(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=mask[:, None],
            position_ids=positions,
            cache=self.cache.view(rows, write_col, attend_from),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache.end = max(self.cache.end, write_col + positions.shape[1])
        return out.logits[:, -1, :]

    # -- leaving ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def release(self, row: int) -> None:
        """Free ``row``: the last row moves into it, in the cache and in ``rows``."""
        moved = self.cache.remove_row(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last
            self._positions[row] = self._positions[moved]
            self._last_tokens[row] = self._last_tokens[moved]
        self._positions = self._positions[: self.num_rows]
        self._last_tokens = self._last_tokens[: self.num_rows]

    def reset(self) -> None:
        """Drop every row (after a failed forward the cache contents are not trusted)."""
        while self.rows:
            self.release(self.num_rows - 1)
