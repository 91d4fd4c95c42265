"""Llama-shaped decoder stacks run as plain tensor ops: transformers' arithmetic without its modules.

transformers' Llama layers are correct but carry per-call Python (decorators, kwargs plumbing, the cache and
attention interfaces, ``[1, H, T, D]`` transposes in and out) that a 135M model feels: at one thread a
1-stream bfloat16 decode step was 48 ms, of which the linear layers took 32 ms (issue #23's profile,
docs/benchmarks.md). Here each layer is the same sequence of tensor ops in the same dtypes (RMSNorm in
float32 cast back before the weight, rotary as ``x * cos + rotate_half(x) * sin``, the packed attention,
``down(act(gate(x)) * up(x))``) on the modules' own weights and the paged cache's pools, with the packed
token axis leading (``[T, H, D]``), so nothing is transposed twice; q, k and v are one matmul
(:class:`~server.engine.cpu_linear.FusedLinear`). gate and up stay two: fused, they were faster for a
decode step's rows but up to 18% slower for a 512-token prefill chunk on the 2-core Xeon.

Same ops, same order, same dtypes: the logits equal the module path's bit for bit in float32, and in
bfloat16 for the steps the tests run (tests/engine/test_llama_stack.py, each family, decode and chunked
prefill), which keeps the PEFT oracle tests meaningful for it. Only the families whose classes compute
exactly Llama's layer are taken (:data:`_FAMILIES`), and only without sliding windows; anything else (a
subclass, a window) keeps transformers' modules.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.engine import cpu_kernels
from server.engine.attention import PackedBatch, packed_attention
from server.engine.cpu_linear import FusedLinear

log = logging.getLogger(__name__)

# model_type -> the transformers module whose classes (prefix + "DecoderLayer", "Attention", "MLP",
# "RMSNorm", "ForCausalLM") compute exactly Llama's layer: Mistral and Qwen2 differ from Llama only in
# sliding windows (refused below) and Qwen2's q/k/v biases (nn.Linear applies them).
_FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm.forward's ops: normalise in float32, round back to the input dtype, then scale
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D]. transformers' apply_rotary_pos_emb with rotate_half.
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@dataclass(frozen=True, slots=True)
class _Layer:
    attention: torch.nn.Module  # the layer's attention module (packed_attention reads its class name)
    qkv: FusedLinear  # q_proj | k_proj | v_proj
    o: torch.nn.Module
    gate: torch.nn.Module
    up: torch.nn.Module
    down: torch.nn.Module
    act: torch.nn.Module
    norm_in: torch.Tensor  # [hidden]
    eps_in: float
    norm_post: torch.Tensor  # [hidden]
    eps_post: float
    scaling: float


class LlamaStack:
    """The model's forward over one packed step, for :meth:`ModelRunner.step`: embeddings in, kept logits
    out, keys and values written into the paged cache's pools on the way."""

    def __init__(self, model: PreTrainedModel, layers: list[_Layer]):
        config = model.config
        self.layers = layers
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        inner = model.model
        self.rotary = inner.rotary_emb
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = model.lm_head

    @classmethod
    def build(cls, model: PreTrainedModel) -> LlamaStack | None:
        """The stack for ``model`` when its classes are one of :data:`_FAMILIES`' exactly, else None (and
        the runner calls the model as transformers built it)."""
        built = getattr(model, "_llama_stack", None)  # another engine on this model already fused it
        if built is not None:
            return built
        config = model.config
        family = _FAMILIES.get(config.model_type)
        if family is None or getattr(config, "sliding_window", None) is not None:
            return None
        module = importlib.import_module(family[0])
        classes = {part: getattr(module, family[1] + part)
                   for part in ("ForCausalLM", "DecoderLayer", "Attention", "MLP", "RMSNorm")}
        if type(model) is not classes["ForCausalLM"] or getattr(config, "pretraining_tp", 1) != 1:
            return None
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            found = (type(layer), type(attention), type(mlp), type(layer.input_layernorm),
                     type(layer.post_attention_layernorm))
            wanted = (classes["DecoderLayer"], classes["Attention"], classes["MLP"], classes["RMSNorm"],
                      classes["RMSNorm"])
            if found != wanted or getattr(attention, "sliding_window", None) is not None:
                return None
        if type(model.model.norm) is not classes["RMSNorm"]:
            return None
        layers = []  # only now that every layer qualifies are their projections fused
        for layer in model.model.layers:
            attention, mlp, norm_in, norm_post = (layer.self_attn, layer.mlp, layer.input_layernorm,
                                                  layer.post_attention_layernorm)
            qkv = FusedLinear([attention.q_proj, attention.k_proj, attention.v_proj])
            layers.append(_Layer(attention, qkv, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                                 mlp.act_fn, norm_in.weight, norm_in.variance_epsilon, norm_post.weight,
                                 norm_post.variance_epsilon, attention.scaling))
        log.info("%s decoder: %d layers run as plain tensor ops (server/engine/llama_stack.py)",
                 family[1], len(layers))
        stack = cls(model, layers)
        object.__setattr__(model, "_llama_stack", stack)  # not a submodule: state_dict and .to() ignore it
        return stack

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, batch: PackedBatch,
                 keys: list[torch.Tensor], values: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """embeds: [T, hidden] (the packed step); positions: [T] long; ``keys[l]``/``values[l]``: layer l's
        slot-major pools [N, Hkv, D], token t's key/value written to slot ``batch.slots[t]``; keep: [K] long,
        packed indices whose logits are returned. Returns [K, vocab]. Call under ``packed(batch)``."""
        tokens = embeds.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.rotary(embeds, positions[None])  # [1, T, D] each, in the model's dtype
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
        hidden = embeds[None]  # [1, T, hidden]: the linears see what transformers' layers pass them
        # bfloat16 on AVX512-BF16: rotary and the cache write as one C pass (cpu_kernels.c), the same values
        fused = cpu_kernels.supports_rope(embeds, keys[0], values[0], dim)
        for layer, key_pool, value_pool in zip(self.layers, keys, values):
            x = _rms_norm(hidden, layer.norm_in, layer.eps_in)
            qkv = layer.qkv(x)  # [1, T, (H + 2 Hkv) * D]
            if fused:
                q = cpu_kernels.rope_cache(qkv[0], cos[:, 0], sin[:, 0], batch.slots, key_pool, value_pool,
                                           heads, dim)  # [T, H, D]
            else:
                q, k, v = qkv.split(layer.qkv.sizes, -1)  # [1, T, H * D], [1, T, Hkv * D] x 2
                q = _rotate(q.view(tokens, heads, dim), cos, sin)  # [T, H, D]
                k = _rotate(k.view(tokens, kv_heads, dim), cos, sin)  # [T, Hkv, D]
                key_pool.index_copy_(0, batch.slots, k)
                value_pool.index_copy_(0, batch.slots, v.view(tokens, kv_heads, dim))
            # packed_attention's interface: query [1, H, T, D], pools [1, Hkv, N, D] (views, no copies)
            keys_view, values_view = key_pool.permute(1, 0, 2)[None], value_pool.permute(1, 0, 2)[None]
            out, _ = packed_attention(layer.attention, q.transpose(0, 1)[None], keys_view, values_view, None,
                                      scaling=layer.scaling)
            hidden = hidden + layer.o(out.view(1, tokens, heads * dim))
            x = _rms_norm(hidden, layer.norm_post, layer.eps_post)
            hidden = hidden + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        # the final norm is per token, so only the kept positions are normalised and projected
        kept = _rms_norm(hidden[:, keep], self.norm, self.norm_eps)
        return self.head(kept)[0]
