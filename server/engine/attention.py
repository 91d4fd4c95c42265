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

from server.engine import cpu_kernels
from server.engine.merged_attention import SPLIT_MIN_CHUNK, SPLIT_MIN_EARLIER, attend_chunk, attend_runs

PACKED_ATTENTION = "prefix_serve_packed"


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decoding rows of similar length whose single queries attend in one SDPA call.

    Their tokens are packed tokens ``[start, stop)``, one per row. ``gather[r]`` lists row ``r``'s slots in
    the cache pool (its task's prefix, then its own tokens, so index == position), padded to the group's
    widest row by repeating a valid slot; ``mask`` hides the padding (None: no row is padded).
    """

    start: int
    stop: int
    gather: torch.Tensor  # [g, W] long
    mask: torch.Tensor | None  # [g, 1, 1, W] bool
    positions: torch.Tensor  # [g] long: each query's position (== its own key's index in gather)
    # [g] long: each row's count of valid slots in gather (what the mask says), for the CPU kernel that reads
    # the pools at those slots directly (cpu_kernels.decode_attention)
    lengths: torch.Tensor
    # A long row alone in its group (g == 1, no mask): its long runs of consecutive pool slots as (first slot,
    # count), read as views of the pool, and ``rest`` the slots of every other key (None: none), gathered
    # (see merged_attention.attend_runs); () when the row is read through ``gather``.
    runs: tuple[tuple[int, int], ...] = ()
    rest: torch.Tensor | None = None  # [W - sum of the runs' counts] long


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """One row's prefill chunk: packed tokens ``[start, stop)`` attend causally to the row's slots."""

    start: int
    stop: int
    gather: torch.Tensor  # [W] long: the row's slots up to its last query (index == position)
    mask: torch.Tensor | None  # [c, W] bool; None: the chunk is the whole row, plain causal (W == c)
    positions: torch.Tensor  # [c] long


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """Where each packed token belongs: the decode groups first, then one prefill chunk per row."""

    slots: torch.Tensor  # [T] long: the pool slot each token's key/value is written to
    decode: tuple[DecodeGroup, ...]
    prefill: tuple[PrefillChunk, ...]


_local = threading.local()


@contextmanager
def packed(batch: PackedBatch):
    """Make ``batch`` the layout that :func:`packed_attention` uses for forwards on this thread."""
    _local.batch = batch
    _local.windowed = {}  # sliding window -> (decode_mask, prefill_mask), built once per forward
    _local.gathered = {}  # (decode group, "k" | "v") -> its gather buffer, reused by every layer
    try:
        yield
    finally:
        _local.batch = None
        _local.windowed = None
        _local.gathered = None


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


def _windowed_masks(batch: PackedBatch, window: int) -> tuple[list, list]:
    """The batch's masks restricted to a sliding window: a query at position q sees key positions c with
    ``q - window < c <= q`` (transformers' ``sliding_window_overlay``; a gathered key's index is its
    position).
    """
    cached = _local.windowed.get(window)
    if cached is not None:
        return cached
    decode, prefill = [], []
    for group in batch.decode:
        c = torch.arange(group.gather.shape[1], device=group.gather.device)  # [W]
        visible = (c[None] > group.positions[:, None] - window)[:, None, None]  # [g, 1, 1, W]
        decode.append(visible if group.mask is None else group.mask & visible)
    for chunk in batch.prefill:
        c = torch.arange(chunk.gather.shape[0], device=chunk.gather.device)  # [W]
        q = chunk.positions[:, None]  # [c, 1]
        visible = (c[None] > q - window) & (c[None] <= q)  # [c, W]: causal within the window
        prefill.append(visible)
    _local.windowed[window] = decode, prefill
    return decode, prefill


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


def _gather(pool: torch.Tensor, slots: torch.Tensor, reuse: tuple[int, str] | None = None) -> torch.Tensor:
    """pool: [N, Hkv, D] (slot-major); slots: [S] long -> [S, Hkv, D].

    ``index_select`` on the leading dim: each slot is one contiguous row copy (advanced indexing goes through
    ``aten::index``'s generic loop, measured 5x (float32) to 15x (bfloat16) slower on AVX-512). With
    ``reuse`` (a decode group's key), the copy goes into a buffer kept for the rest of the forward: every
    layer gathers the same shape, and allocating it afresh per layer cost about 3% of a 32-row decode step.
    Only without autograd (``out=`` has no backward), which is how the engine runs.
    """
    if reuse is None or torch.is_grad_enabled():
        return pool.index_select(0, slots)
    buffers = _local.gathered
    buffer = buffers.get(reuse)
    shape = (slots.shape[0], *pool.shape[1:])
    if buffer is None or buffer.shape != shape or buffer.dtype != pool.dtype:
        buffer = buffers[reuse] = pool.new_empty(shape)
    return torch.index_select(pool, 0, slots, out=buffer)


def _prefill_chunk(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: PrefillChunk,
                   mask: torch.Tensor | None, scale: float, softcap: float | None,
                   window: int | None) -> torch.Tensor:
    """torch's attention for one prefill chunk: q [H, c, D] its queries; key/value the slot-major pools
    [N, Hkv, D]; mask [c, W] (None: the chunk is the whole row, plain causal). Returns [c, H, D]."""
    heads, c, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    earlier = chunk.gather.shape[0] - c
    if (mask is not None and c >= SPLIT_MIN_CHUNK and earlier >= SPLIT_MIN_EARLIER * c and softcap is None
            and not window and key.device.type == "cpu"):
        # it follows many earlier keys: two unmasked attentions merged (CPU; merged_attention.py)
        return attend_chunk(q, key, value, chunk, scale)
    qp = q[None]  # [1, H, c, D]
    # [W, Hkv, D] -> [1, Hkv, W, D]
    kp = _gather(key, chunk.gather).transpose(0, 1)[None]
    vp = _gather(value, chunk.gather).transpose(0, 1)[None]
    if softcap is None:
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None,
                                            scale=scale, enable_gqa=groups > 1)  # [1, H, c, D]
    else:  # [1, Hkv, G, c, D] queries; mask [1, 1, 1, c, W]
        if mask is None:
            mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        qg = qp.reshape(1, kv_heads, groups, c, dim)
        op = _softcapped_attention(qg, kp, vp, mask[None, None, None], scale, softcap)
        op = op.reshape(1, heads, c, dim)
    return op[0].transpose(0, 1)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key/value: the layer's whole pools as [1, Hkv, N, D] views of the slot-major
    [N, Hkv, D] tensors (the runner's cache view returns them after writing the new tokens). Returns
    [1, T, H, D], as transformers' attention functions do."""
    window, softcap = _check_kwargs(module, kwargs)
    batch: PackedBatch | None = getattr(_local, "batch", None)
    if batch is None:
        if softcap is not None:
            return _unpacked_softcapped(module, query, key, value, attention_mask, scaling, softcap)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if window:
        decode_masks, prefill_masks = _windowed_masks(batch, window)
    else:
        decode_masks = [g.mask for g in batch.decode]
        prefill_masks = [c.mask for c in batch.prefill]
    # [H, T, D]; the pools back to slot-major [N, Hkv, D] (undoing the cache view's permute: no copy)
    q, key, value = query[0], key[0].transpose(0, 1), value[0].transpose(0, 1)
    heads, tokens, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    out = q.new_empty(tokens, heads, dim)
    # the slot-major pools as the cache holds them (a family that hands over other keys keeps torch's path)
    native = (softcap is None and not window and bool(batch.decode) and key.is_contiguous()
              and value.is_contiguous() and cpu_kernels.supports(q, key, value)
              and cpu_kernels.supports_shape(heads, kv_heads, dim))
    for i, (group, mask) in enumerate(zip(batch.decode, decode_masks)):
        g, w = group.gather.shape
        if native:  # the pools read at each row's slots, no gathered copy (cpu_kernels.c)
            rows = q[:, group.start:group.stop].transpose(0, 1)  # [g, H, D], a view
            cpu_kernels.decode_attention(rows, key, value, group.gather, group.lengths, scale,
                                         out[group.start:group.stop])
            continue
        # One query per row: fold the query heads that share a key/value head into the query axis
        # ([g, Hkv, G, D]; head h = kv * G + g, transformers' repeat_kv order), so no key is ever repeated.
        qd = q[:, group.start:group.stop].transpose(0, 1).reshape(g, kv_heads, groups, dim)
        if group.runs and softcap is None and not window and key.device.type == "cpu":
            out[group.start:group.stop] = attend_runs(qd, key, value, group, scale).reshape(g, heads, dim)
            continue
        flat = group.gather.flatten()
        kd = _gather(key, flat, (i, "k")).view(g, w, kv_heads, dim).transpose(1, 2)  # [g, Hkv, W, D]
        vd = _gather(value, flat, (i, "v")).view(g, w, kv_heads, dim).transpose(1, 2)
        if softcap is None:
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        else:  # [g, Hkv, G, 1, D] queries against [g, Hkv, W, D] keys; mask [g, 1, 1, 1, W]
            m = None if mask is None else mask[:, :, None]
            od = _softcapped_attention(qd[:, :, :, None], kd, vd, m, scale, softcap)
        out[group.start:group.stop] = od.reshape(g, heads, dim)
    # C kernels for prefill chunks: AMX tiles in bfloat16 (cpu_prefill.c; torch's flash attention ran at about
    # a third of their speed), AVX-512 FMAs in float32 (cpu_prefill_f32.c)
    tiles = (softcap is None and not window and bool(batch.prefill)
             and cpu_kernels.supports_prefill(q, key, value, heads, kv_heads, dim))
    for chunk, mask in zip(batch.prefill, prefill_masks):
        queries, rows = q[:, chunk.start:chunk.stop], out[chunk.start:chunk.stop]  # [H, c, D], [c, H, D]
        if tiles:
            cpu_kernels.prefill_attention(queries, key, value, chunk.gather, scale, rows)
        else:
            rows[:] = _prefill_chunk(queries, key, value, chunk, mask, scale, softcap, window)
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
