"""Key/value memory by the block, the tensors: one pool per layer, written through a per-step view.

Every layer's keys (and values) live in one pool of ``num_blocks`` fixed-size blocks of ``block_size`` token
slots, stored ``[1, Hkv, num_blocks * block_size, D]`` so that a slot is one index on dim 2. Nothing is laid
out per request: which slots a row owns is :class:`~server.engine.block_manager.BlockManager`'s accounting
(block tables, shared task prefixes, cached prompt blocks). Attention reads each row's own slots (see
:mod:`server.engine.attention`), so no row pays for a longer neighbour.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.engine.attention import PackedBatch
from server.engine.block_manager import BlockManager


class PagedKVCache:
    """The pool's tensors: per layer ``keys[l]``, ``values[l]`` of shape ``[1, Hkv, num_blocks * B, D]`` (the
    leading 1 keeps the layout transformers' attention modules expect: JetMoE tiles keys along dim 1)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, manager: BlockManager):
        self.num_layers, self.manager = num_layers, manager
        shape = (1, num_kv_heads, manager.num_blocks * manager.block_size, head_dim)
        # torch.empty: memory is touched only where a block is used. A slot is read only after it was written
        # (attention gathers written slots and masks its padding), so stale contents never enter a result.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def bytes_per_block(self) -> int:
        k = self.keys[0]
        return 2 * self.num_layers * k.shape[1] * self.manager.block_size * k.shape[3] * k.element_size()

    def write_pending_prefixes(self) -> None:
        """Copy new task entries' prefix ``[L, 2, Hkv, P, D]`` into their blocks (once per task version)."""
        b = self.manager.block_size
        for task in self.manager.pending_prefix_writes:
            tensor = task.tensor()
            assert tensor is not None, "a task joining now is held by its request"
            p = task.num_prefix
            slots = torch.tensor([task.blocks[i // b] * b + i % b for i in range(p)], dtype=torch.long,
                                 device=self.keys[0].device)
            for layer in range(self.num_layers):
                self.keys[layer][0, :, slots] = tensor[layer, 0]
                self.values[layer][0, :, slots] = tensor[layer, 1]
        self.manager.pending_prefix_writes.clear()

    def view(self, batch: PackedBatch) -> CacheView:
        return CacheView(self, batch)


class _ViewLayer(CacheLayerMixin):
    """One layer of a :class:`CacheView`: scatters the new keys/values, returns the whole pools."""

    def __init__(self, cache: PagedKVCache, layer: int, batch: PackedBatch):
        super().__init__()
        self.cache, self.layer, self.batch = cache, layer, batch
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [1, Hkv, T, D] for the T packed tokens -> token t goes to slot slots[t]
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        # index_copy_, not ``keys[0, :, slots] = ...``: index_put on a non-leading dim is a slow generic loop
        keys[0].index_copy_(1, self.batch.slots, key_states[0])
        values[0].index_copy_(1, self.batch.slots, value_states[0])
        return keys, values  # packed_attention gathers each row's slots itself

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class CacheView(Cache):
    """What the model sees as its cache for one packed forward (see :mod:`server.engine.attention`)."""

    def __init__(self, cache: PagedKVCache, batch: PackedBatch):
        super().__init__(layers=[_ViewLayer(cache, i, batch) for i in range(cache.num_layers)])
