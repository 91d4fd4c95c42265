"""The one builder of real PEFT adapters for the tests: ``peft_adapter`` writes a prompt-learning adapter with
PEFT itself (``get_peft_model`` + ``save_pretrained``), its values made trained-looking, and returns PEFT's
model (the oracle) with the folder's files (what an upload sends).

``peft_config`` names the recipes the tests use, so that every test asks for "prefix", "p_tuning", ... alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

# kind -> what PEFT builds. "chatglm*" are PEFT prefixes that tests re-save as THUDM ChatGLM checkpoints.
PEFT_KINDS = ("prefix", "prefix_projection", "p_tuning", "p_tuning_mlp", "p_tuning_lstm", "prompt_tuning",
              "chatglm", "chatglm_projection")


def peft_config(kind: str, num_virtual_tokens: int, encoder_hidden_size: int = 48) -> PeftConfig:
    """PEFT's config for ``kind`` (one of ``PEFT_KINDS``); ``encoder_hidden_size`` is the width of the
    reparameterising MLP/LSTM of the projected kinds."""
    if kind in ("prefix", "chatglm"):
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    if kind in ("prefix_projection", "chatglm_projection"):
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                  prefix_projection=True, encoder_hidden_size=encoder_hidden_size)
    if kind in ("p_tuning", "p_tuning_mlp"):
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                   encoder_hidden_size=encoder_hidden_size)
    if kind == "p_tuning_lstm":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                   encoder_hidden_size=encoder_hidden_size,
                                   encoder_reparameterization_type="LSTM")
    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    raise ValueError(kind)


def read_dir(path: Path) -> dict[str, bytes]:
    """{file name: bytes} of the files directly in ``path``."""
    return {name: (path / name).read_bytes() for name in os.listdir(path) if (path / name).is_file()}


def peft_adapter(model: torch.nn.Module, config: PeftConfig | str, out: Path, *, seed: int | None,
                 scale: float | None = None, num_virtual_tokens: int | None = None, safe: bool = True,
                 save: bool = True) -> tuple[PeftModel, dict[str, bytes]]:
    """A real PEFT adapter on ``model`` (PEFT wraps it in place: pass a copy to keep it bare).

    ``config``: a PEFT config, or a kind for ``peft_config`` (then with ``num_virtual_tokens``). ``seed``
    seeds torch before PEFT initialises the adapter; None continues the caller's random stream. The
    prompt-encoder parameters are then multiplied by ``scale``, or, with no scale, get N(0, 1) noise added
    (either way, values a trained adapter could have, far enough from PEFT's init to change outputs).
    Saved with ``save_pretrained`` into ``out`` (``safe``: safetensors, else a torch pickle) unless ``save``
    is false. Returns PEFT's model and the saved files ({} when not saved)."""
    if isinstance(config, str):
        assert num_virtual_tokens is not None, "a kind needs num_virtual_tokens"
        config = peft_config(config, num_virtual_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    params = list(peft_model.prompt_encoder.parameters())
    assert params, "PEFT model without prompt encoder parameters"
    with torch.no_grad():
        for param in params:
            if scale is None:
                param.add_(torch.randn_like(param))
            else:
                param.mul_(scale)
    if not save:
        return peft_model, {}
    peft_model.save_pretrained(out, safe_serialization=safe)
    return peft_model, read_dir(out)
