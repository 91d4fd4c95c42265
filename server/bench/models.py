"""Random-weight base models of real sizes, built from a config with no download: ``--model random:NAME``.

Serving speed depends on the architecture's shapes, not on the weights, so a Llama-3.2-1B-shaped or a
Llama-3.1-8B-shaped model with random weights times what the real one would. The tokenizer is the
embedded model's (its ids are a subset of every vocabulary here); only `ignore_eos` requests are timed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from server.engine.model import BaseModel, default_model_dir, load_base_model, wrap_model

PREFIX = "random:"

# The shapes of the published configs (vocabulary, widths, layers, heads, RoPE base: transformers 5 takes it
# in rope_parameters); context kept short, since the benchmark's requests are.
CONFIGS: dict[str, Callable[[], LlamaConfig]] = {
    "tiny": lambda: LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "llama-1b": lambda: LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
                                    rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}),
    "llama-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192,
                                    rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}),
}


def is_random(spec: str) -> bool:
    return spec.startswith(PREFIX)


def random_config(spec: str) -> LlamaConfig:
    name = spec.removeprefix(PREFIX)
    if name not in CONFIGS:
        raise ValueError(f"--model {spec}: choose one of {', '.join(PREFIX + n for n in CONFIGS)}")
    return CONFIGS[name]()


def random_model(spec: str, dtype: torch.dtype, device: str, seed: int = 0) -> BaseModel:
    """``random:NAME`` built directly on ``device`` in ``dtype`` (an 8B model never passes through host
    memory)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = random_config(spec)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return wrap_model(model.to(device), tokenizer, spec)  # a no-op unless the device context was not honoured


def load_model(spec: str, dtype: torch.dtype, device: str) -> BaseModel:
    """``random:NAME``, ``default`` or a model folder, as ``--model`` takes it."""
    if is_random(spec):
        return random_model(spec, dtype, device)
    return load_base_model(spec, dtype, device)


def save_model(base: BaseModel, folder: Path) -> Path:
    """Write ``base`` as a Hugging Face model folder, so a `prefix-serve serve --model FOLDER` process can
    serve the same weights."""
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return folder
