"""SlotKVCache's slot accounting: what ``reserve`` allocates (geometric growth capped by the key/value
budget, exact requests always honoured), that running rows keep their contents, and the row bookkeeping.
Tiny CPU tensors, no model."""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_cache import SlotKVCache

LAYERS, HEADS, DIM = 2, 1, 2


def make_cache(max_slots: int = 10_000, rows: int = 4, cols: int = 8) -> SlotKVCache:
    return SlotKVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), max_slots,
                       rows=rows, cols=cols)


def capacity(cache: SlotKVCache) -> tuple[int, int]:
    return cache.row_capacity, cache.col_capacity


def test_a_reservation_within_capacity_keeps_the_buffers():
    cache = make_cache()
    keys, values = cache.keys, cache.values
    cache.reserve(4, 8)
    cache.reserve(1, 1)
    assert capacity(cache) == (4, 8)
    assert cache.keys is keys and cache.values is values


@pytest.mark.parametrize(("max_slots", "rows", "cols", "expected"), [
    (10_000, 5, 8, (8, 8)),  # one row more: rows double, columns stay
    (10_000, 2, 9, (4, 12)),  # one column more: columns grow by half, rows stay
    (10_000, 5, 9, (8, 12)),  # both grow
    (10_000, 20, 8, (20, 8)),  # more than doubling: exactly what was asked
    (10_000, 4, 100, (4, 100)),  # more than half again: exactly what was asked
    (40, 5, 8, (5, 8)),  # doubling to 8 rows would pass 40 slots: only as many rows as fit (40 // 8)
    (40, 4, 9, (4, 10)),  # columns: 12 would pass 40 slots, 40 // 4 = 10 fit
    (40, 6, 10, (6, 10)),  # an exact request is honoured even over the budget (60 slots)
], ids=["rows", "cols", "both", "rows-exact", "cols-exact", "rows-capped", "cols-capped", "over-budget"])
def test_reserve_grows_geometrically_within_the_budget(max_slots, rows, cols, expected):
    cache = make_cache(max_slots)
    cache.reserve(rows, cols)
    assert capacity(cache) == expected
    assert cache.keys[0].shape == (expected[0], HEADS, expected[1], DIM)
    assert len(cache.keys) == len(cache.values) == LAYERS
    assert cache.nbytes == 2 * LAYERS * expected[0] * HEADS * expected[1] * DIM * 4


def test_growing_keeps_the_running_rows_contents_and_zeroes_the_rest():
    cache = make_cache()
    for length in (3, 5):
        row = cache.add_row()
        cache.lengths[row] = length
        contents = torch.arange(length * DIM, dtype=torch.float32).view(length, DIM) + 100 * row
        for buf in (*cache.keys, *cache.values):
            buf[row, :, :length] = contents
    before = [buf.clone() for buf in (*cache.keys, *cache.values)]
    cache.reserve(9, 20)
    assert capacity(cache) == (9, 20)
    assert cache.lengths == [3, 5] and cache.num_rows == 2
    for old, new in zip(before, (*cache.keys, *cache.values)):
        assert torch.equal(new[:2, :, :5], old[:2, :, :5])
        assert not new[2:].any() and not new[:, :, 5:].any()


def test_rows_are_added_only_into_reserved_capacity():
    cache = make_cache(rows=2)
    assert [cache.add_row(), cache.add_row()] == [0, 1]
    assert cache.lengths == [0, 0]
    with pytest.raises(AssertionError, match="reserve"):
        cache.add_row()
    cache.reserve(3, 8)
    assert cache.add_row() == 2 and cache.num_rows == 3


def test_prefix_move_and_pop_keep_the_lengths_in_step():
    cache = make_cache()
    prefix = torch.randn(LAYERS, 2, HEADS, 3, DIM)  # [L, 2, Hkv, P, D]
    first, second = cache.add_row(), cache.add_row()
    cache.write_prefix(second, prefix)
    assert cache.lengths == [0, 3]
    for layer in range(LAYERS):
        assert torch.equal(cache.keys[layer][second, :, :3], prefix[layer, 0])
        assert torch.equal(cache.values[layer][second, :, :3], prefix[layer, 1])
    cache.move_row(second, first)  # the first row finished: the last one takes its place
    cache.pop_row()
    assert cache.lengths == [3] and cache.num_rows == 1
    assert torch.equal(cache.keys[1][first, :, :3], prefix[1, 0])
