"""Checks an artifact against the loaded base model before it may be stored or served."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixes.artifact import ModelShape, PrefixArtifact
from prefixes.formats import InvalidArtifact


@dataclass(frozen=True, slots=True)
class ArtifactLimits:
    # A prefix longer than this is almost surely a mistake (prefix-tuning uses 10-200 virtual tokens), and it
    # costs every request of the task that much attention and KV memory.
    max_virtual_tokens: int = 1024
    # Trained prefixes stay within the range of the model's own activations (keys and values of order 1-100,
    # soft prompts of order 1). Values far beyond it are corrupt or hostile: near float32's limit they
    # overflow attention scores to inf and the logits of the whole batch to NaN.
    max_abs_value: float = 1e4


def validate_artifact(artifact: PrefixArtifact, shape: ModelShape, limits: ArtifactLimits) -> None:
    t = artifact.tensor
    if not t.is_floating_point():
        raise InvalidArtifact(f"{artifact.tensor_name}: dtype {t.dtype} is not a float type.")
    expected: tuple[int, ...]
    if artifact.kind.is_deep:
        expected = (shape.num_layers, 2, shape.num_kv_heads, artifact.num_virtual_tokens, shape.head_dim)
        what = "[num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim]"
    else:
        expected = (artifact.num_virtual_tokens, shape.hidden_size)
        what = "[num_virtual_tokens, hidden_size]"
    if tuple(t.shape) != expected:
        raise InvalidArtifact(
            f"{artifact.tensor_name}: shape {tuple(t.shape)} does not fit the base model; "
            f"expected {what} = {expected}."
        )
    n = artifact.num_virtual_tokens
    if not 1 <= n <= min(limits.max_virtual_tokens, shape.max_positions - 1):
        raise InvalidArtifact(
            f"num_virtual_tokens={n}: must be between 1 and "
            f"{min(limits.max_virtual_tokens, shape.max_positions - 1)}."
        )
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InvalidArtifact(
            f"{artifact.tensor_name}: {bad} values are NaN or infinite; retrain or re-export it."
        )
    largest = float(t.abs().max())
    if largest > limits.max_abs_value:
        bad = int((t.abs() > limits.max_abs_value).sum())
        raise InvalidArtifact(
            f"{artifact.tensor_name}: {bad} values exceed {limits.max_abs_value:g} in magnitude (largest "
            f"{largest:.3g}); trained prefixes stay far below that, so this one is corrupt or was scaled by "
            "mistake: re-export it."
        )
