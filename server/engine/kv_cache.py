"""The batch's key/value cache: preallocated per-layer buffers with one row per running request.

Row ``r`` holds its request at columns ``[0, lengths[r])``, and a token's column is its position id:

    prefix-tuning row:  [ prefix KV (P) | prompt | generated ... ]
    soft-prompt row:    [ virtual tokens (P) | prompt | generated ... ]
    base row:           [ prompt | generated ... ]

Rows never move relative to each other's columns: a forward writes each new token at its own
``(row, column)`` (see :class:`CacheView`) and attention masks each row at its own length, so nothing is
re-padded or shifted when requests join. Active rows stay dense in ``[0, num_rows)``: a finished row is
overwritten by another (one row copy), so every forward reads views of the buffers, never gathered copies.
Buffers are reallocated only to grow (rarely: geometric, capped by the key/value budget).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.engine.attention import PackedBatch


class SlotKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_slots: int, rows: int = 4, cols: int = 128):
        """``max_slots`` caps rows x columns of geometric growth (an exact request may still exceed it)."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_slots = dtype, device, max_slots
        self.lengths: list[int] = []  # per running row: columns in use
        self._allocate(rows, cols)

    def _allocate(self, rows: int, cols: int) -> None:
        shape = (rows, self.num_kv_heads, cols, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                       for _ in range(self.num_layers)]

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    @property
    def row_capacity(self) -> int:
        return self.keys[0].shape[0]

    @property
    def col_capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.keys[0].numel() * self.keys[0].element_size()

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for ``rows`` rows of ``cols`` columns, keeping the running rows' contents."""
        if rows <= self.row_capacity and cols <= self.col_capacity:
            return
        new_rows = max(rows, self.row_capacity if rows <= self.row_capacity else 2 * self.row_capacity)
        new_cols = max(cols, self.col_capacity if cols <= self.col_capacity else self.col_capacity * 3 // 2)
        new_rows = max(rows, min(new_rows, self.max_slots // max(cols, 1)))
        new_cols = max(cols, min(new_cols, self.max_slots // new_rows))
        old_k, old_v = self.keys, self.values
        self._allocate(new_rows, new_cols)
        n, used = self.num_rows, max(self.lengths, default=0)
        for layer in range(self.num_layers):
            self.keys[layer][:n, :, :used] = old_k[layer][:n, :, :used]
            self.values[layer][:n, :, :used] = old_v[layer][:n, :, :used]

    def add_row(self) -> int:
        """Append an empty row (capacity must have been reserved); returns its index."""
        assert self.num_rows < self.row_capacity, "reserve() before add_row()"
        self.lengths.append(0)
        return self.num_rows - 1

    def write_prefix(self, row: int, prefix_kv: torch.Tensor) -> None:
        """Place a task's prefix ``[L, 2, Hkv, P, D]`` at columns ``[0, P)`` of an empty ``row``."""
        p = prefix_kv.shape[3]
        for layer in range(self.num_layers):
            self.keys[layer][row, :, :p] = prefix_kv[layer, 0]
            self.values[layer][row, :, :p] = prefix_kv[layer, 1]
        self.lengths[row] = p

    def move_row(self, src: int, dst: int) -> None:
        """Overwrite row ``dst`` with row ``src`` (which stays as it is until popped)."""
        used = self.lengths[src]
        for buf in (*self.keys, *self.values):
            buf[dst, :, :used] = buf[src, :, :used]
        self.lengths[dst] = used

    def pop_row(self) -> None:
        self.lengths.pop()

    def view(self, batch: PackedBatch) -> CacheView:
        return CacheView(self, batch)


class _ViewLayer(CacheLayerMixin):
    """One layer of a :class:`CacheView`: scatters the new keys/values, returns the whole buffers."""

    def __init__(self, cache: SlotKVCache, layer: int, batch: PackedBatch):
        super().__init__()
        self.cache, self.layer, self.batch = cache, layer, batch
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [1, Hkv, T, D] for the T packed tokens -> token t goes to (rows[t], :, cols[t], :)
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        keys[self.batch.rows, :, self.batch.cols] = key_states[0].transpose(0, 1)
        values[self.batch.rows, :, self.batch.cols] = value_states[0].transpose(0, 1)
        return keys, values  # packed_attention slices each row's window itself

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class CacheView(Cache):
    """What the model sees as its cache for one packed forward (see :mod:`server.engine.attention`)."""

    def __init__(self, cache: SlotKVCache, batch: PackedBatch):
        super().__init__(layers=[_ViewLayer(cache, i, batch) for i in range(cache.num_layers)])
