"""The batch's key/value cache: preallocated per-layer buffers with one row per running request.

Columns are shared cache positions. Every running row's newest token sits at column ``end - 1``, so a
decode step writes all rows at column ``end`` and attends over ``[start, end]``. What a row holds, and
where, is recorded in ``valid``: a row admitted into a running batch is laid out as

    [ unused | prefix KV (P) | padding | soft prompt + prompt | generated ... ]
                                         ^ right-aligned to the batch's frontier

so rows with different prefix lengths, prompt lengths and kinds share one rectangular tensor without
ever re-padding the running rows. A finished row is replaced by the last row (one row copy), keeping
active rows dense in ``[0, num_rows)`` so every forward runs on views, never on gathered copies.

Buffers only move when they must: growing (rare, geometric), or shifting all columns when a prefill
needs more room on the left than the frontier leaves, or compacting when the right edge is reached.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_slots: int, rows: int = 4, cols: int = 128):
        """``max_slots`` caps rows x columns of geometric growth (an exact request may still exceed it)."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_slots = dtype, device, max_slots
        self.num_rows = 0
        self.end = 0  # the column the next decode step writes
        self.start = 0  # the first column any running row uses
        self._allocate(rows, cols)

    def _allocate(self, rows: int, cols: int) -> None:
        shape = (rows, self.num_kv_heads, cols, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.valid = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)  # [rows, cols]
        self.first_col = torch.zeros(rows, dtype=torch.long)  # [rows] on host: the row's first used column

    @property
    def row_capacity(self) -> int:
        return self.valid.shape[0]

    @property
    def col_capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.keys[0].numel() * self.keys[0].element_size()

    # -- layout management ----------------------------------------------------------------------------------

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for ``rows`` rows and columns ``[0, cols)``, keeping the running rows' contents."""
        if rows <= self.row_capacity and cols <= self.col_capacity:
            return
        new_rows = max(rows, self.row_capacity if rows <= self.row_capacity else 2 * self.row_capacity)
        new_cols = max(cols, self.col_capacity if cols <= self.col_capacity else self.col_capacity * 3 // 2)
        new_rows = max(rows, min(new_rows, self.max_slots // max(cols, 1)))
        new_cols = max(cols, min(new_cols, self.max_slots // new_rows))
        old_k, old_v, old_valid, old_first = self.keys, self.values, self.valid, self.first_col
        self._allocate(new_rows, new_cols)
        n, lo, hi = self.num_rows, self.start, self.end
        for layer in range(self.num_layers):
            self.keys[layer][:n, :, lo:hi] = old_k[layer][:n, :, lo:hi]
            self.values[layer][:n, :, lo:hi] = old_v[layer][:n, :, lo:hi]
        self.valid[:n, lo:hi] = old_valid[:n, lo:hi]
        self.first_col[:n] = old_first[:n]

    def shift(self, offset: int) -> None:
        """Move every running row's columns by ``offset`` (right if positive); capacity must allow it."""
        if offset == 0 or self.num_rows == 0:
            self.start += offset
            self.end += offset
            return
        n, lo, hi = self.num_rows, self.start, self.end
        for buf in (*self.keys, *self.values):
            buf[:n, :, lo + offset : hi + offset] = buf[:n, :, lo:hi].clone()
        window = self.valid[:n, lo:hi].clone()
        self.valid[:n] = False
        self.valid[:n, lo + offset : hi + offset] = window
        self.first_col[:n] += offset
        self.start += offset
        self.end += offset

    def make_room_left(self, width: int) -> None:
        """Ensure ``width`` columns exist left of ``end`` for a prefill that ends at ``end``."""
        if self.num_rows == 0:
            self.start = self.end = width
        elif self.end < width:
            self.reserve(self.num_rows, width + 1)
            self.shift(width - self.end)

    def make_room_right(self, width: int = 1) -> None:
        """Ensure columns ``[end, end + width)`` exist, compacting to the left before growing."""
        if self.end + width <= self.col_capacity:
            return
        if self.start > 0:
            self.shift(-self.start)
        self.reserve(self.num_rows, self.end + width)

    def remove_row(self, row: int) -> int | None:
        """Free ``row`` by moving the last row into it; returns the index of the moved row (or None)."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            lo, hi = self.start, self.end
            for buf in (*self.keys, *self.values):
                buf[row, :, lo:hi] = buf[last, :, lo:hi]
            self.valid[row] = self.valid[last]
            self.first_col[row] = self.first_col[last]
            moved = last
        self.num_rows = last
        self.start = int(self.first_col[: self.num_rows].min()) if self.num_rows else self.end
        return moved

    def add_rows(self, first_cols: list[int]) -> slice:
        """Append rows that begin at ``first_cols``; the caller writes their contents."""
        n = self.num_rows
        rows = slice(n, n + len(first_cols))
        self.reserve(rows.stop, self.end + 1)
        self.valid[rows] = False
        self.first_col[rows] = torch.tensor(first_cols, dtype=torch.long)
        self.num_rows = rows.stop
        self.start = min([self.start, *first_cols]) if n else min(first_cols)
        return rows

    def write_prefix(self, row: int, col: int, prefix_kv: torch.Tensor) -> None:
        """Place a task's prefix ``[L, 2, Hkv, P, D]`` at columns ``[col, col + P)`` of ``row``."""
        p = prefix_kv.shape[3]
        for layer in range(self.num_layers):
            self.keys[layer][row, :, col : col + p] = prefix_kv[layer, 0]
            self.values[layer][row, :, col : col + p] = prefix_kv[layer, 1]
        self.valid[row, col : col + p] = True

    # -- views for one forward pass -------------------------------------------------------------------------

    def view(self, rows: slice, write_col: int, attend_from: int) -> "CacheView":
        return CacheView(self, rows, write_col, attend_from)


class _ViewLayer(CacheLayerMixin):
    """One layer of a :class:`CacheView`: writes new keys/values into the buffer, returns the window."""

    def __init__(self, cache: SlotKVCache, layer: int, rows: slice, write_col: int, attend_from: int):
        super().__init__()
        self.cache, self.layer, self.rows = cache, layer, rows
        self.write_col, self.attend_from = write_col, attend_from
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [rows, Hkv, S, D] for the S new tokens of this forward
        hi = self.write_col + key_states.shape[2]
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        keys[self.rows, :, self.write_col : hi] = key_states
        values[self.rows, :, self.write_col : hi] = value_states
        return keys[self.rows, :, self.attend_from : hi], values[self.rows, :, self.attend_from : hi]

    def get_seq_length(self) -> int:
        return self.write_col - self.attend_from

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class CacheView(Cache):
    """What the model sees as its cache for one forward: rows ``rows``, new tokens written from
    ``write_col``, attention over ``[attend_from, write_col + S)``. The 4-D attention mask passed with it
    covers exactly that window, so transformers never builds a mask of its own."""

    def __init__(self, cache: SlotKVCache, rows: slice, write_col: int, attend_from: int):
        super().__init__(layers=[_ViewLayer(cache, i, rows, write_col, attend_from)
                                 for i in range(cache.num_layers)])
