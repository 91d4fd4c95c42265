"""Builders shared by the engine tests: tiny models per architecture, real PEFT adapters, and the oracle.

The oracle is PEFT's own forward pass with full recompute: a request is correct when every token the
engine produced is the argmax of PEFT's logits given the same prompt and the engine's earlier tokens.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    AutoModelForCausalLM,
)

from prefixes.formats import parse_artifact
from prefixes.store import ResidentPrefix
from server.engine.model import BaseModel
from placement import NEAR_TIE, place

VOCAB = 256
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=None),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=512),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=512, word_embed_proj_dim=64),
}

# Adapter recipes: name -> (PEFT config factory, or "chatglm*" for the THUDM checkpoint format)
KINDS = ("prefix", "prefix_projection", "p_tuning", "prompt_tuning", "chatglm", "chatglm_projection")


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config._attn_implementation = "sdpa"
    # Default initialisers (std 0.02) give near-uniform logits that no prefix can move; a wider one makes
    # tiny models opinionated enough for "the prefix changed the output" to be a meaningful check.
    config.initializer_range = 0.3
    return place(AutoModelForCausalLM.from_config(config).eval())


@dataclass
class Adapter:
    """One task: what the engine serves (``prefix``) and PEFT's model for the same task (``oracle``)."""

    name: str
    kind: str
    prefix: ResidentPrefix
    oracle: torch.nn.Module
    files: dict[str, bytes]


def save_tiny_llama(folder: Path, tokenizer, max_positions: int) -> Path:
    """A tiny random Llama with the real tokenizer (its chat template too) as a model folder: `--model PATH`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_dir(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in os.listdir(path) if (path / name).is_file()}


def _peft_config(kind: str, num_virtual_tokens: int):
    if kind in ("prefix", "chatglm"):
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    if kind in ("prefix_projection", "chatglm_projection"):
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                  prefix_projection=True, encoder_hidden_size=48)
    if kind == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                   encoder_hidden_size=48)
    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    raise ValueError(kind)


def make_adapter(base: BaseModel, kind: str, num_virtual_tokens: int, workdir: Path, seed: int,
                 scale: float = 2.0) -> Adapter:
    """A trained-looking adapter (random, scaled so it visibly changes outputs) in a real on-disk format."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base.model), _peft_config(kind, num_virtual_tokens))
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.mul_(scale)
    out = workdir / f"{kind}-{seed}"
    out.mkdir(parents=True)
    if kind.startswith("chatglm"):
        # The ChatGLM-6B PrefixEncoder state dict: embedding (+ trans.0/trans.2 when projected). The oracle
        # is the same PEFT model in training mode, which runs the MLP on every forward.
        encoder = peft_model.prompt_encoder["default"]
        names = {"embedding.weight": "embedding.weight", "transform.0.weight": "trans.0.weight",
                 "transform.0.bias": "trans.0.bias", "transform.2.weight": "trans.2.weight",
                 "transform.2.bias": "trans.2.bias"}
        state = {f"transformer.prefix_encoder.{names[k]}": v.detach().clone()
                 for k, v in encoder.state_dict().items()}
        safetensors.torch.save_file(state, out / "model.safetensors")
        oracle = peft_model.eval()
    else:
        peft_model.save_pretrained(out)
        oracle = PeftModel.from_pretrained(copy.deepcopy(base.model), out).eval()
    files = read_dir(out)
    artifact = parse_artifact(files, base.shape)
    artifact.tensor = artifact.tensor.to(base.device, base.dtype)
    name = f"{kind}-{seed}"
    return Adapter(name, kind, ResidentPrefix.unstored(name, artifact), oracle, files)


@torch.no_grad()
def oracle_logits(model: torch.nn.Module, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Logits [len(output_ids), V] that predicted each generated token, by one full forward pass."""
    ids = torch.tensor([prompt_ids + output_ids[:-1]], device=model.device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return logits[-len(output_ids):]


def assert_oracle_tokens(model: torch.nn.Module, prompt_ids: list[int], output_ids: list[int], what: str) -> None:
    logits = oracle_logits(model, prompt_ids, output_ids)
    for step, token in enumerate(output_ids):
        best = int(logits[step].argmax())
        if token != best:
            gap = float(logits[step, best] - logits[step, token])
            assert gap < NEAR_TIE, (
                f"{what}: step {step} produced {token}, oracle argmax {best} (logit gap {gap:.5f}); "
                f"engine {output_ids}, oracle {logits.argmax(-1).tolist()}"
            )
