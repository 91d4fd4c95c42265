"""Attention over disjoint sets of keys, each attended on its own and merged by log-sum-exp: softmax over
their union without building it. packed_attention (server/engine/attention.py) uses it on CPU where the
one-call alternative costs more: a long decoding row's runs of consecutive pool slots read as views instead
of a gather (:func:`attend_runs`), and a prefill chunk after many earlier keys as two unmasked calls instead
of one call with a ``[c, W]`` mask (:func:`attend_chunk`). CPU only: the merge needs the log-sum-exp that
CPU's flash attention returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # attention.py imports this module; these are only the layouts it passes
    from server.engine.attention import DecodeGroup, PrefillChunk


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Softmax attention over the union of disjoint key sets, from each set's own: ``outs[i]`` [..., S, D]
    and its log-sum-exp ``lses[i]`` [..., S] (float32). Weighted by each piece's share of every query's
    softmax, in float32; returned in the outputs' dtype."""
    weights = torch.stack(lses).softmax(0).unsqueeze(-1)  # [R, ..., S, 1]
    return (torch.stack(outs).float() * weights).sum(0).to(outs[0].dtype)


def attend_runs(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: DecodeGroup,
                 scale: float) -> torch.Tensor:
    """One long row's attention without gathering its history: q [1, Hkv, G, D] (its query heads folded per
    key/value head); key/value the slot-major pools [N, Hkv, D]. Returns [1, Hkv, G, D].

    Each run of consecutive slots is attended as a view of the pool (no copy) and the remaining keys as one
    gathered piece; the pieces' outputs are merged by their log-sum-exp, which is softmax attention over all
    of them (keys are already rotated and no mask applies, so the order of keys does not matter). Gathering a
    6,000-slot row cost as much as its attention (kv bench, docs/benchmarks.md). CPU only: the merge needs
    the log-sum-exp that CPU's flash attention returns.
    """
    pieces = [(key[s: s + n], value[s: s + n]) for s, n in group.runs]
    if group.rest is not None:
        pieces.append((key.index_select(0, group.rest), value.index_select(0, group.rest)))
    outs, lses = [], []
    for k, v in pieces:  # [n, Hkv, D] -> [1, Hkv, n, D], a strided view
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], 0.0, False, scale=scale)
        outs.append(o)  # [1, Hkv, G, D]
        lses.append(lse)  # [1, Hkv, G] float32
    if len(outs) == 1:
        return outs[0]
    return merge(outs, lses)


def attend_chunk(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: PrefillChunk,
                  scale: float) -> torch.Tensor:
    """A prefill chunk that follows earlier keys, without a mask: q [H, c, D] (its queries, positions
    ``W - c .. W - 1``); key/value the slot-major pools [N, Hkv, D]. Returns [c, H, D].

    Its queries see every earlier key of the row and their own keys causally. So it is two attentions merged
    by their log-sum-exp: against the earlier keys with no mask (the query heads of each key/value head
    folded into one query axis, so keys are not repeated) and against its own c keys with SDPA's causal
    flag (square, so top-left alignment is right). The masked call this replaces built a [c, W] float mask
    per layer and read it for every score: for a 6,000-token prompt in chunks of 512, 1 thread, bfloat16,
    the masked attention took 4.7 s of 7.9 s and the mask conversion alone 0.8 s. CPU only, like
    attend_runs: the merge needs the log-sum-exp that CPU's flash attention returns.
    """
    heads, c, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    earlier, own = chunk.gather[:-c], chunk.gather[-c:]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # head h = kv * groups + g (transformers' repeat_kv order): [H, c, D] -> [1, Hkv, groups * c, D]
    folded = q.reshape(1, kv_heads, groups * c, dim)
    k = key.index_select(0, earlier).transpose(0, 1)[None]  # [1, Hkv, W - c, D]
    v = value.index_select(0, earlier).transpose(0, 1)[None]
    o_earlier, lse_earlier = flash(folded, k, v, 0.0, False, scale=scale)  # [1, Hkv, groups * c, D], [.., c]
    k = key.index_select(0, own).transpose(0, 1).repeat_interleave(groups, 0)[None]  # [1, H, c, D]
    v = value.index_select(0, own).transpose(0, 1).repeat_interleave(groups, 0)[None]
    o_own, lse_own = flash(q[None], k, v, 0.0, True, scale=scale)  # [1, H, c, D], [1, H, c]
    out = merge([o_earlier.reshape(1, heads, c, dim), o_own], [lse_earlier.reshape(1, heads, c), lse_own])
    return out[0].transpose(0, 1)  # [c, H, D]



# A prefill chunk of at least SPLIT_MIN_CHUNK tokens after at least SPLIT_MIN_EARLIER times as many earlier
# keys attends through attend_chunk. One layer's chunk at 1 thread (2-core Xeon), split / masked time:
# 512 tokens after 600 keys 1.31 (bfloat16) and 0.88 (float32), after 2,048 0.89 and 0.84, after 3,000
# 0.81 and 0.79; 12 tokens after 600 1.56 and 1.35 (the second call and the merge cost more than the mask
# saves on a small chunk, e.g. a request after a cached preamble).
SPLIT_MIN_CHUNK, SPLIT_MIN_EARLIER = 64, 4
