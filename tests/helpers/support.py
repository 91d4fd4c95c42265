"""Builders shared by the engine tests: tiny models per architecture, real PEFT adapters, and the oracle.

The oracle is PEFT's own forward pass with full recompute: a request is correct when every token the
engine produced is the argmax of PEFT's logits given the same prompt and the engine's earlier tokens.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    Glm4Config,
    GlmConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    Starcoder2Config,
)

from prefixes.formats import parse_artifact
from prefixes.records import ResidentPrefix
from server.engine.model import BaseModel
from tests.helpers.adapters import peft_adapter, read_dir
from tests.helpers.placement import NEAR_TIE, place

VOCAB = 256
# Sliding windows far below the test's sequence lengths (prefix + prompt + output reach ~30 positions), so
# that every windowed family is checked with its window binding.
WINDOW = 10
_LLAMA_LIKE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # within the tiny vocabulary
# Families served with no adaptation beyond what the generic path already does; their tiny configs differ only
# in model_type (True: give it a binding sliding window, for the families whose layers can be windowed).
NO_ADAPTATION = {
    "apertus": False, "arcee": False, "bitnet": False, "cohere": False, "cohere2": True, "ernie4_5": False,
    "exaone4": True, "gemma": False, "glm4_moe": False, "granite": False, "granitemoe": False,
    "helium": False, "hunyuan_v1_dense": False, "jetmoe": False, "ministral": True, "nemotron": False,
    "olmo": False, "olmo2": False,
    "olmo3": True, "olmoe": False, "phi": False, "phimoe": False, "qwen2_moe": False, "seed_oss": False,
    "smollm3": False, "stablelm": False, "ernie4_5_moe": False, "hunyuan_v1_moe": False,
    "granitemoeshared": False, "flex_olmo": False, "jais2": False, "hyperclovax": False,
    "mellum": True, "cwm": True,
}
_GPT_LIKE = {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512,
             "bos_token_id": 1, "eos_token_id": 2}
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**{**_LLAMA_LIKE, "num_key_value_heads": 1}),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE, sliding_window=WINDOW),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=512),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64),
    # GLM / GLM-4: half-width interleaved rotary; 2 multi-query groups (key/value heads) of head_dim 16.
    "glm": lambda: GlmConfig(**_LLAMA_LIKE, head_dim=16, **_IDS),
    "glm4": lambda: Glm4Config(**_LLAMA_LIKE, head_dim=16, **_IDS),
    # Qwen3: q/k norms; layer 0 global, layer 1 windowed (max_window_layers=1).
    "qwen3": lambda: Qwen3Config(**_LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32),
    # Gemma 2: local/global alternation, a soft-cap low enough to bind on these logits, and a scale that is
    # not head_dim**-0.5 (query_pre_attn_scalar 24 vs head_dim 16).
    # Untied output embeddings: with Gemma's sqrt(hidden)-scaled, tied embeddings a tiny random model only
    # ever predicts its input token, which no prefix can change.
    "gemma2": lambda: Gemma2Config(**_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=24,
                                   sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                   tie_word_embeddings=False, **_IDS),
    "gemma3_text": lambda: Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=24,
                                            sliding_window=WINDOW, tie_word_embeddings=False,
                                            layer_types=["sliding_attention", "full_attention"], **_IDS),
    "phi3": lambda: Phi3Config(**_LLAMA_LIKE, sliding_window=WINDOW, partial_rotary_factor=0.5, **_IDS),
    "mixtral": lambda: MixtralConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=WINDOW),
    "starcoder2": lambda: Starcoder2Config(**_LLAMA_LIKE, sliding_window=WINDOW),
    # Falcon-40B/180B layout: 2 key/value groups, broadcast to the 4 query heads before caching.
    "falcon": lambda: FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2,
                                   alibi=False, bias=False, max_position_embeddings=512, **_IDS),
    **{model_type: (lambda t=model_type, w=window: AutoConfig.for_model(
        t, **_LLAMA_LIKE, head_dim=16, tie_word_embeddings=False, **_IDS,
        **({"sliding_window": WINDOW} if w else {}))) for model_type, window in NO_ADAPTATION.items()},
    # Four small experts, two per token, where the defaults (up to 128 experts) would dominate the
    # test's time.
    "qwen2_moe": lambda: AutoConfig.for_model("qwen2_moe", **_LLAMA_LIKE, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=32, tie_word_embeddings=False,
                                              **_IDS),
    "olmoe": lambda: AutoConfig.for_model("olmoe", **_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                                          tie_word_embeddings=False, **_IDS),
    # Multi-query attention: one key/value head (StarCoder / SantaCoder).
    "gpt_bigcode": lambda: AutoConfig.for_model("gpt_bigcode", **_GPT_LIKE, multi_query=True),
    # Rotary on the first 8 of 16 dimensions per head (interleaved), no grouped heads.
    "gptj": lambda: AutoConfig.for_model("gptj", **_GPT_LIKE, rotary_dim=8, tie_word_embeddings=False),
    "codegen": lambda: AutoConfig.for_model("codegen", **_GPT_LIKE, n_ctx=512, rotary_dim=8,
                                            tie_word_embeddings=False),
    "persimmon": lambda: AutoConfig.for_model("persimmon", **{**_LLAMA_LIKE, "num_key_value_heads": 4},
                                              tie_word_embeddings=False, **_IDS),
    "ctrl": lambda: AutoConfig.for_model("ctrl", **_GPT_LIKE, dff=128),
    "glm4_moe": lambda: AutoConfig.for_model("glm4_moe", **_LLAMA_LIKE, head_dim=16, n_routed_experts=4,
                                             num_experts_per_tok=2, n_group=1, topk_group=1,
                                             moe_intermediate_size=32, tie_word_embeddings=False, **_IDS),
}
# The oracle's attention implementation where SDPA would compute something else: transformers' SDPA path
# cannot soft-cap, so Gemma 2's reference is its eager attention.
ORACLE_ATTENTION = {"gemma2": "eager"}

# Adapter recipes: name -> (PEFT config factory, or "chatglm*" for the THUDM checkpoint format)
KINDS = ("prefix", "prefix_projection", "p_tuning", "prompt_tuning", "chatglm", "chatglm_projection")


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config._attn_implementation = ORACLE_ATTENTION.get(arch, "sdpa")
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
    """A tiny random Llama with the real tokenizer (its chat template too) as a model folder:
    `--model PATH`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base: BaseModel, kind: str, num_virtual_tokens: int, workdir: Path, seed: int,
                 scale: float = 2.0) -> Adapter:
    """A trained-looking adapter (random, scaled so it visibly changes outputs) in a real on-disk format."""
    out = workdir / f"{kind}-{seed}"
    out.mkdir(parents=True)
    chatglm = kind.startswith("chatglm")
    peft_model, files = peft_adapter(copy.deepcopy(base.model), kind, out, seed=seed, scale=scale,
                                     num_virtual_tokens=num_virtual_tokens, save=not chatglm)
    if chatglm:
        # The ChatGLM-6B PrefixEncoder state dict: embedding (+ trans.0/trans.2 when projected). The oracle
        # is the same PEFT model in training mode, which runs the MLP on every forward.
        encoder = peft_model.prompt_encoder["default"]
        names = {"embedding.weight": "embedding.weight", "transform.0.weight": "trans.0.weight",
                 "transform.0.bias": "trans.0.bias", "transform.2.weight": "trans.2.weight",
                 "transform.2.bias": "trans.2.bias"}
        state = {f"transformer.prefix_encoder.{names[k]}": v.detach().clone()
                 for k, v in encoder.state_dict().items()}
        safetensors.torch.save_file(state, out / "model.safetensors")
        files = read_dir(out)
        oracle = peft_model.eval()
    else:
        oracle = PeftModel.from_pretrained(copy.deepcopy(base.model), out).eval()
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


def assert_oracle_tokens(model: torch.nn.Module, prompt_ids: list[int], output_ids: list[int], what: str,
                         near_tie: float = NEAR_TIE) -> None:
    """Every generated token is the oracle's argmax, or within ``near_tie`` of it (placement.NEAR_TIE: two
    float paths may order logits that close differently)."""
    logits = oracle_logits(model, prompt_ids, output_ids)
    for step, token in enumerate(output_ids):
        best = int(logits[step].argmax())
        if token != best:
            gap = float(logits[step, best] - logits[step, token])
            assert gap < near_tie, (
                f"{what}: step {step} produced {token}, oracle argmax {best} (logit gap {gap:.5f}); "
                f"engine {output_ids}, oracle {logits.argmax(-1).tolist()}"
            )


def race(calls) -> list[object]:
    """Run ``calls`` at once (released together by a barrier); each one's result or exception."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the refusals are what the callers count
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))
