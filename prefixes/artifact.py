"""The canonical, served form of a task: plain tensors, whatever format it was uploaded in.

Two shapes exist, because the literature injects learned vectors at two depths:

- ``PREFIX_TUNING`` (prefix-tuning, P-Tuning v2, the ChatGLM-6B ``PrefixEncoder``): per-layer key/value
  vectors prepended to every attention layer. Stored as ``past_key_values`` of shape
  ``[num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim]`` (index 0 of dim 1 is the key).
- ``P_TUNING`` / ``PROMPT_TUNING`` (P-Tuning v1, prompt tuning): virtual token embeddings placed before the
  prompt at the input layer. Stored as ``prompt_embeddings`` of shape ``[num_virtual_tokens, hidden_size]``.

Any reparameterisation network (MLP, LSTM) has already been run by the time an artifact exists.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

import torch


class PrefixKind(str, enum.Enum):
    PREFIX_TUNING = "prefix_tuning"
    P_TUNING = "p_tuning"
    PROMPT_TUNING = "prompt_tuning"

    @property
    def is_deep(self) -> bool:
        """True when the prefix lives in every layer's key/value cache, not at the input."""
        return self is PrefixKind.PREFIX_TUNING


KV_TENSOR = "past_key_values"
EMBEDDING_TENSOR = "prompt_embeddings"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a prefix must agree with in the base model; built by the engine from the model config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    model_type: str = ""

    @property
    def kv_width(self) -> int:
        """Width of one virtual token in PEFT's flattened prefix layout:
        layers * (k, v) * heads * head_dim."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


@dataclass(slots=True)
class PrefixArtifact:
    kind: PrefixKind
    tensor: torch.Tensor  # see module docstring for the shape of each kind
    source_format: str  # "peft", "chatglm" or "prefix-serve"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def tensor_name(self) -> str:
        return KV_TENSOR if self.kind.is_deep else EMBEDDING_TENSOR

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.tensor.shape[-2] if self.kind.is_deep else self.tensor.shape[0])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def sha256(self) -> str:
        """Digest of the served tensor's kind, shape, dtype and bytes: equal digests serve identically."""
        t = self.tensor.detach().contiguous().cpu()
        h = hashlib.sha256()
        h.update(f"{self.kind.value}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


def unflatten_prefix(flat: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """PEFT / ChatGLM flattened prefix ``[P, L*2*Hkv*D]`` -> ``[L, 2, Hkv, P, D]``.

    Both view the flat row as ``(L*2, Hkv, D)`` with row ``2*layer + 0`` the key and ``+1`` the value.
    """
    p = flat.shape[0]
    kv = flat.view(p, shape.num_layers * 2, shape.num_kv_heads, shape.head_dim)
    kv = kv.permute(1, 2, 0, 3)  # [L*2, Hkv, P, D]
    return kv.reshape(shape.num_layers, 2, shape.num_kv_heads, p, shape.head_dim).contiguous()


def flatten_prefix(kv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unflatten_prefix`: ``[L, 2, Hkv, P, D]`` -> ``[P, L*2*Hkv*D]``."""
    num_layers, _, heads, p, d = kv.shape
    return kv.reshape(num_layers * 2, heads, p, d).permute(2, 0, 1, 3).reshape(p, -1).contiguous()
