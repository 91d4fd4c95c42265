"""Packed attention: one forward computes the decode tokens of every running row and prefill chunks of others.

The model sees its input as one packed sequence ``[1, T]``: first one decode token for each of rows
``0..d-1`` (in row order), then prefill chunks of rows ``d..d+m-1``. Projections and MLPs therefore run once
over ``T`` tokens with no padding, and only attention needs to know which row each token belongs to. That
knowledge is a :class:`PackedBatch`, set for the duration of a forward on the calling thread (the engine
thread), and read by :func:`packed_attention`, which transformers calls in every layer once the model's
attention implementation is :data:`PACKED_ATTENTION` (see :func:`use_packed_attention`).

Per layer it honours what transformers passes that changes the result: ``scaling``, ``sliding_window``
(the row masks are narrowed to the window) and ``softcap`` (Gemma 2's tanh logit cap, which SDPA lacks); any
other such option is refused (:class:`UnsupportedAttention`), never ignored. Falcon, which computes attention
inline, is the one family whose attention core is rerouted here (:func:`use_packed_attention`).

Outside such a forward (the benchmark's bare-model baseline, tests calling the model directly on another
thread) the same model falls back to transformers' own SDPA attention (a soft-capped one where SDPA cannot),
so nothing else changes behaviour.
"""

from __future__ import annotations

import threading
import types
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
    # [m, S] long: packed index of chunk j's i-th query (padding repeats the last)
    prefill_gather: torch.Tensor | None
    prefill_take: torch.Tensor | None  # [T - d] long: flat (j * S + i) of each real query, in packed order
    prefill_mask: torch.Tensor | None  # [m, 1, S, Wp] bool: causal within the row, over columns [0, Wp)

    @property
    def decode_width(self) -> int:
        assert self.decode_mask is not None, "only a batch with decoding rows has a decode width"
        return self.decode_mask.shape[-1]

    @property
    def prefill_width(self) -> int:
        assert self.prefill_mask is not None, "only a batch with prefilling rows has a prefill width"
        return self.prefill_mask.shape[-1]


_local = threading.local()


@contextmanager
def packed(batch: PackedBatch):
    """Make ``batch`` the layout that :func:`packed_attention` uses for forwards on this thread."""
    _local.batch = batch
    _local.windowed = {}  # sliding window -> (decode_mask, prefill_mask), built once per forward
    try:
        yield
    finally:
        _local.batch = None
        _local.windowed = None


# Keyword arguments transformers' attention modules pass that cannot change this function's result: positions
# are already in the rotated query/key and in ``batch.cols``; the cache was written by the cache view.
_INERT_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions",
                           "output_router_logits"})


class UnsupportedAttention(NotImplementedError):
    """A layer asked for attention semantics the packed path does not implement (refused, never ignored)."""


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> tuple[int | None, float | None]:
    """The per-layer options that change the result: ``sliding_window`` (int or None) and ``softcap``.

    transformers hands every attention function the layer's window as ``sliding_window`` (flash attention has
    no mask and relies on it alone), so it is the one source used here for a layer's window; ``softcap`` is
    Gemma-2's attention logit soft-capping. Anything else that would change the output (``s_aux``/``sinks``
    attention sinks, ``is_causal=False``, chunked attention) is refused rather than silently dropped.
    """
    for name, value in kwargs.items():
        if name in _INERT_KWARGS or name in ("sliding_window", "softcap") or value is None:
            continue
        if name == "is_causal" and value:
            continue
        raise UnsupportedAttention(
            f"{type(module).__name__} passes {name}={value!r} to its attention function, which "
            "prefix-serve's packed attention does not implement; refusing rather than computing a different "
            "result."
        )
    return kwargs.get("sliding_window"), kwargs.get("softcap")


def _windowed_masks(batch: PackedBatch, window: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The batch's masks restricted to a sliding window: a query at column q sees key columns c with
    ``q - window < c <= q`` (transformers' ``sliding_window_overlay``; column == position, see the runner)."""
    cached = _local.windowed.get(window)
    if cached is not None:
        return cached
    decode_mask = prefill_mask = None
    if batch.num_decode:
        q = batch.cols[: batch.num_decode]  # [d]
        c = torch.arange(batch.decode_width, device=q.device)  # [Wd]
        assert batch.decode_mask is not None, "set whenever num_decode is"
        decode_mask = batch.decode_mask & (c[None] > q[:, None] - window)[:, None, None]  # [d, 1, 1, Wd]
    if batch.prefill_gather is not None:
        q = batch.cols[batch.prefill_gather]  # [m, S]
        c = torch.arange(batch.prefill_width, device=q.device)  # [Wp]
        assert batch.prefill_mask is not None, "set together with prefill_gather"
        prefill_mask = batch.prefill_mask & (c > q[..., None] - window)[:, None]  # [m, 1, S, Wp]
    _local.windowed[window] = decode_mask, prefill_mask
    return decode_mask, prefill_mask


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, softcap: float) -> torch.Tensor:
    """Attention with logits squashed to ``softcap * tanh(logits / softcap)`` (SDPA has no such option).

    q: [N, Hkv, G, S, D] (G query heads per key/value head); k, v: [N, Hkv, W, D]; mask: bool, broadcastable
    to [N, Hkv, G, S, W]. Returns [N, Hkv, G, S, D]. The softmax runs in float32, as transformers' eager does.
    """
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale  # [N, Hkv, G, S, W]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v.unsqueeze(2))


def _unpacked_softcapped(module, query, key, value, attention_mask, scaling, softcap):
    """Outside a packed forward (SDPA cannot soft-cap): query [B, H, Tq, D], key/value [B, Hkv, Tk, D], mask a
    bool [B, 1, Tq, Tk] from ``sdpa_mask`` or None when plain causal. Returns [B, Tq, H, D]."""
    b, heads, tq, dim = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    if attention_mask is None:  # causal, the queries being the last tq of the tk positions
        attention_mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)[None, None]
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask: 0 where visible
    q = query.reshape(b, kv_heads, heads // kv_heads, tq, dim)
    out = _softcapped_attention(q, key, value, attention_mask[:, :, None], scaling or dim**-0.5, softcap)
    return out.reshape(b, heads, tq, dim).transpose(1, 2), None


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key/value: the layer's whole cache buffers [R, Hkv, C, D] (the runner's cache
    view returns them after writing the new tokens). Returns [1, T, H, D], as transformers' attention
    functions do."""
    window, softcap = _check_kwargs(module, kwargs)
    batch: PackedBatch | None = getattr(_local, "batch", None)
    if batch is None:
        if softcap is not None:
            return _unpacked_softcapped(module, query, key, value, attention_mask, scaling, softcap)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if window:
        decode_mask, prefill_mask = _windowed_masks(batch, window)
    else:
        decode_mask, prefill_mask = batch.decode_mask, batch.prefill_mask
    q = query[0]  # [H, T, D]
    heads, tokens, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    out = q.new_empty(tokens, heads, dim)
    d = batch.num_decode
    if d:
        # One query per row: fold the query heads that share a key/value head into the query axis
        # ([d, Hkv, G, D]; head h = kv * G + g, transformers' repeat_kv order), so no key is ever repeated.
        qd = q[:, :d].transpose(0, 1).reshape(d, kv_heads, groups, dim)
        w = batch.decode_width
        kd, vd = key[:d, :, :w], value[:d, :, :w]
        if softcap is None:
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=decode_mask, scale=scale)
        else:  # [d, Hkv, G, 1, D] queries against [d, Hkv, Wd, D] keys; mask [d, 1, 1, 1, Wd]
            assert decode_mask is not None, "a batch with decoding rows has their mask"
            od = _softcapped_attention(qd[:, :, :, None], kd, vd, decode_mask[:, :, None], scale, softcap)
        out[:d] = od.reshape(d, heads, dim)
    if batch.prefill_gather is not None:
        m, s = batch.prefill_gather.shape
        qp = q[:, batch.prefill_gather.flatten()].reshape(heads, m, s, dim).transpose(0, 1)  # [m, H, S, D]
        rows, w = batch.prefill_rows, batch.prefill_width
        kp, vp = key[rows, :, :w], value[rows, :, :w]
        if softcap is None:
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=prefill_mask, scale=scale,
                                                enable_gqa=groups > 1)  # [m, H, S, D]
        else:  # [m, Hkv, G, S, D] queries; mask [m, 1, 1, S, Wp]
            assert prefill_mask is not None, "set together with prefill_gather"
            qg = qp.reshape(m, kv_heads, groups, s, dim)
            op = _softcapped_attention(qg, kp, vp, prefill_mask[:, :, None], scale, softcap)
            op = op.reshape(m, heads, s, dim)
        # Real queries, in packed order, are tokens d..T-1 (index_select: no data-dependent shapes, no sync).
        assert batch.prefill_take is not None, "set together with prefill_gather"
        out[d:] = op.transpose(1, 2).reshape(m * s, heads, dim).index_select(0, batch.prefill_take)
    return out[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
# Outside a packed forward transformers builds its own masks for this implementation name: SDPA's.
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def _falcon_attention(self, hidden_states: torch.Tensor, alibi: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, position_ids=None, layer_past=None,
                      use_cache: bool = False, output_attentions: bool = False,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """``FalconAttention.forward`` (rotary, no ALiBi) with its attention core as :func:`packed_attention`.

    Falcon computes attention inline instead of through transformers' AttentionInterface, so this is the one
    attention adapter in the engine. hidden_states: [B, T, hidden]; returns ([B, T, hidden], None). The
    cache holds what Falcon's own cache holds, hence what PEFT prefixes: ``num_attention_heads`` key/value
    heads with the new decoder architecture (its grouped keys are broadcast to every query head before
    caching), one with ``multi_query``, all of them otherwise.
    """
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    if alibi is not None:
        raise UnsupportedAttention("Falcon with ALiBi: the packed attention has no position bias")
    query, key, value = self._split_heads(self.query_key_value(hidden_states))  # [B, T, H | Hkv, D] each
    b, t = query.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query = query.transpose(1, 2).reshape(b, self.num_heads, t, self.head_dim)  # [B, H, T, D]
    key = key.transpose(1, 2).reshape(b, kv_heads, t, self.head_dim)  # [B, Hkv, T, D]
    value = value.transpose(1, 2).reshape(b, kv_heads, t, self.head_dim)
    assert position_embeddings is not None, "rotary Falcon passes its position embeddings to every layer"
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out, _ = packed_attention(self, query, key, value, attention_mask,
                              scaling=self.inv_norm_factor)  # [B, T, H, D]
    return self.dense(out.reshape(b, t, self.num_heads * self.head_dim)), None


def _route_falcon(model: PreTrainedModel) -> None:
    from transformers.models.falcon.modeling_falcon import FalconAttention

    for module in model.modules():
        if isinstance(module, FalconAttention):
            if type(module) is not FalconAttention:
                raise UnsupportedAttention(f"{type(module).__name__}: only Falcon's SDPA/eager attention is "
                                           "routed")
            kv_heads = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
            assert kv_heads is not None, "FalconConfig fills num_kv_heads in"
            # what the SDPA fallback reads; nn.Module's __getattr__ types every unknown attribute as a
            # Tensor or Module, so mypy refuses a plain int here
            module.num_key_value_groups = module.num_heads // kv_heads  # type: ignore[assignment]
            # rerouting this instance's forward is the point
            module.forward = types.MethodType(_falcon_attention, module)  # type: ignore[method-assign]


# model_type -> how to route the attention of a family that bypasses transformers' AttentionInterface.
_ROUTES = {"falcon": _route_falcon}


def use_packed_attention(model: PreTrainedModel) -> None:
    route = _ROUTES.get(model.config.model_type)
    if route is not None:
        route(model)
        return
    model.set_attn_implementation(PACKED_ATTENTION)
    if model.config._attn_implementation != PACKED_ATTENTION:
        raise RuntimeError(f"{type(model).__name__} does not accept a custom attention implementation")
