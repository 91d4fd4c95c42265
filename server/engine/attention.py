"""Packed attention: one forward computes the decode tokens of every running row and prefill chunks of others.

The model sees its input as one packed sequence ``[1, T]``: first one decode token for each of rows
``0..d-1`` (in row order), then prefill chunks of rows ``d..d+m-1``. Projections and MLPs therefore run once
over ``T`` tokens with no padding, and only attention needs to know which row each token belongs to. That
knowledge is a :class:`PackedBatch`, set for the duration of a forward on the calling thread (the engine
thread), and read by :func:`packed_attention`, which transformers calls in every layer once the model's
attention implementation is :data:`PACKED_ATTENTION` (see :func:`use_packed_attention`).

Outside such a forward (the benchmark's bare-model baseline, tests calling the model directly on another
thread) the same model falls back to transformers' own SDPA attention, so nothing else changes behaviour.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "prefix_serve_packed"


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """Where each packed token belongs. Column == position id for every row kind (see the runner)."""

    rows: torch.Tensor  # [T] long: the cache row each token's key/value is written to
    cols: torch.Tensor  # [T] long: the column (= position) it is written at
    num_decode: int  # d: tokens 0..d-1 are one decode token each for rows 0..d-1
    decode_mask: torch.Tensor | None  # [d, 1, 1, Wd] bool: row r attends to its columns [0, length_r]
    prefill_rows: slice  # rows d..d+m-1, one prefill chunk each, in packed order
    prefill_gather: torch.Tensor | None  # [m, S] long: packed index of chunk j's i-th query (padding repeats the last)
    prefill_take: torch.Tensor | None  # [T - d] long: flat (j * S + i) of each real query, in packed order
    prefill_mask: torch.Tensor | None  # [m, 1, S, Wp] bool: causal within the row, over columns [0, Wp)

    @property
    def decode_width(self) -> int:
        return self.decode_mask.shape[-1]

    @property
    def prefill_width(self) -> int:
        return self.prefill_mask.shape[-1]


_local = threading.local()


@contextmanager
def packed(batch: PackedBatch):
    """Make ``batch`` the layout that :func:`packed_attention` uses for forwards on this thread."""
    _local.batch = batch
    try:
        yield
    finally:
        _local.batch = None


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key/value: the layer's whole cache buffers [R, Hkv, C, D] (the runner's cache view
    returns them after writing the new tokens). Returns [1, T, H, D], as transformers' attention functions do."""
    batch: PackedBatch | None = getattr(_local, "batch", None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query[0]  # [H, T, D]
    heads, tokens, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    out = q.new_empty(tokens, heads, dim)
    d = batch.num_decode
    if d:
        # One query per row: fold the query heads that share a key/value head into the query axis
        # ([d, Hkv, G, D]; head h = kv * G + g, transformers' repeat_kv order), so no key is ever repeated.
        qd = q[:, :d].transpose(0, 1).reshape(d, kv_heads, groups, dim)
        w = batch.decode_width
        od = F.scaled_dot_product_attention(qd, key[:d, :, :w], value[:d, :, :w], attn_mask=batch.decode_mask,
                                            scale=scaling)
        out[:d] = od.reshape(d, heads, dim)
    if batch.prefill_gather is not None:
        m, s = batch.prefill_gather.shape
        qp = q[:, batch.prefill_gather.flatten()].reshape(heads, m, s, dim).transpose(0, 1)  # [m, H, S, D]
        rows, w = batch.prefill_rows, batch.prefill_width
        op = F.scaled_dot_product_attention(qp, key[rows, :, :w], value[rows, :, :w], attn_mask=batch.prefill_mask,
                                            scale=scaling, enable_gqa=groups > 1)  # [m, H, S, D]
        # Real queries, in packed order, are tokens d..T-1 (index_select: no data-dependent shapes, no sync).
        out[d:] = op.transpose(1, 2).reshape(m * s, heads, dim).index_select(0, batch.prefill_take)
    return out[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
# Outside a packed forward transformers builds its own masks for this implementation name: SDPA's.
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model: PreTrainedModel) -> None:
    model.set_attn_implementation(PACKED_ATTENTION)
    if model.config._attn_implementation != PACKED_ATTENTION:
        raise RuntimeError(f"{type(model).__name__} does not accept a custom attention implementation")
