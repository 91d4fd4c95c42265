"""What the per-family oracle matrix (test_engine_oracle.py) does not cover: ChatGLM P-Tuning v2 checkpoints
on transformers' GLM-4, half-precision dtypes, and the refusals (unsupported families, attention options)."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from peft import PrefixTuningConfig, get_peft_model

from prefixes.formats import InvalidArtifact, parse_artifact
from prefixes.records import ResidentPrefix
from server.engine.attention import UnsupportedAttention, packed_attention
from server.engine.engine import Engine, EngineConfig
from server.engine.model import SUPPORTED_MODEL_TYPES, UnsupportedModel, check_supported, wrap_model
from server.engine.sequence import SamplingParams, Sequence
from tests.engine.test_engine_oracle import check_against_oracle, run_staggered
from tests.helpers.adapters import peft_adapter, read_dir
from tests.helpers.support import (
    TINY_CONFIGS,
    VOCAB,
    WINDOW,
    assert_oracle_tokens,
    make_adapter,
    oracle_logits,
    tiny_model,
)

P = 6  # virtual tokens


class Glm4PrefixEncoder(torch.nn.Module):
    """Shaped like THUDM's ChatGLM2/3 / GLM-4 ``PrefixEncoder``: a virtual token is
    ``kv_size = num_layers * kv_channels * multi_query_group_num * 2`` wide, and ``prefix_projection`` runs it
    through ``Linear(kv_size, hidden) -> Tanh -> Linear(hidden, kv_size)``."""

    def __init__(self, config, projection: bool):
        super().__init__()
        kv_size = config.num_hidden_layers * config.head_dim * config.num_key_value_heads * 2
        self.embedding = torch.nn.Embedding(P, kv_size)
        self.trans = torch.nn.Sequential(torch.nn.Linear(kv_size, config.hidden_size), torch.nn.Tanh(),
                                         torch.nn.Linear(config.hidden_size, kv_size)) if projection else None

    def forward(self) -> torch.Tensor:  # [P, kv_size]
        x = self.embedding.weight
        return self.trans(x) if self.trans is not None else x


def glm4_get_prompt(flat: torch.Tensor, config) -> list[torch.Tensor]:
    """GLM-4's ``get_prompt`` for batch 1, re-laid as per-layer [2, groups, P, kv_channels] (key, value).

    GLM-4 views the encoder output as [batch, P, num_layers * 2, multi_query_group_num, kv_channels] and
    permutes it to [num_layers * 2, P, batch, groups, kv_channels], split into per-layer pairs."""
    pkv = flat.view(1, P, config.num_hidden_layers * 2, config.num_key_value_heads, config.head_dim)
    return [pair[:, :, 0].permute(0, 2, 1, 3) for pair in pkv.permute([2, 1, 0, 3, 4]).split(2)]


@pytest.mark.parametrize("projection", [False, True], ids=["bare", "prefix_projection"])
def test_chatglm_checkpoint_on_glm4(projection, tokenizer):
    """A GLM-4 P-Tuning v2 checkpoint lands in the cache as GLM-4 lays it out, and the engine serves it as
    PEFT serves the same key/values (PEFT cannot read the THUDM file; its bare prefix is given the output)."""
    base = wrap_model(tiny_model("glm4", seed=2), tokenizer, "glm4")
    config = base.model.config
    torch.manual_seed(11)
    encoder = Glm4PrefixEncoder(config, projection)
    with torch.no_grad():
        for param in encoder.parameters():
            param.mul_(40.0 if projection else 2.0)  # visible in the output (tanh bounds the projected one)
        flat = encoder()  # [P, L * 2 * groups * kv_channels]
    state = {f"transformer.prefix_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    artifact = parse_artifact({"model.safetensors": safetensors.torch.save(state)}, base.shape)

    assert base.shape.kv_width == flat.shape[1]
    for layer, expected in enumerate(glm4_get_prompt(flat, config)):
        torch.testing.assert_close(artifact.tensor[layer], expected, rtol=1e-6, atol=1e-6)

    oracle = get_peft_model(copy.deepcopy(base.model),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        oracle.prompt_encoder["default"].embedding.weight.copy_(flat)
    oracle.eval()
    prefix = ResidentPrefix.unstored("glm4-ptv2", artifact)
    rng = random.Random(4)
    seqs = [Sequence([rng.randrange(VOCAB) for _ in range(n)],
                     SamplingParams(max_new_tokens=6, ignore_eos=True), prefix) for n in (3, 9, 1)]
    run_staggered(Engine(base, EngineConfig(max_batch_size=3, max_step_tokens=5)), seqs, [0, 1, 2])
    changed = False
    for seq in seqs:
        assert_oracle_tokens(oracle, seq.prompt_ids, seq.output_ids, "glm4-ptv2")
        without = oracle_logits(base.model, seq.prompt_ids, seq.output_ids).argmax(-1)
        changed |= bool((without != torch.tensor(seq.output_ids)).any())
    assert changed, "the prefix never changed a token"


def test_chatglm_6b_sized_prefix_on_glm4_names_the_layout(tokenizer):
    base = wrap_model(tiny_model("glm4"), tokenizer, "glm4")
    width = base.shape.num_layers * 2 * base.shape.hidden_size  # ChatGLM-6B: a key/value per attention head
    state = {"transformer.prefix_encoder.embedding.weight": torch.randn(P, width)}
    with pytest.raises(InvalidArtifact, match="multi-query groups"):
        parse_artifact({"model.safetensors": safetensors.torch.save(state)}, base.shape)


# Two float paths may order two logits differently only when they are this close (logit units). bfloat16
# keeps 8 significant bits (relative step 2**-8) and float16 11 (2**-11), on logits of magnitude ~5.
HALF_NEAR_TIE = {torch.bfloat16: 0.15, torch.float16: 0.03}


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(4, 4, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(a[None], a[None], a[None])
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_matches_peft_in_the_same_dtype(dtype, tokenizer, tmp_path):
    """float32 is the oracle matrix's dtype; here Qwen3 (q/k norms, a binding window) in half precision."""
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} attention")
    base = wrap_model(tiny_model("qwen3", seed=4).to(dtype), tokenizer, "qwen3")
    assert base.dtype == dtype
    adapters = [make_adapter(base, kind, n, tmp_path, seed)
                for seed, (kind, n) in enumerate([("prefix", 5), ("p_tuning", 3), ("prompt_tuning", 4)])]
    rng = random.Random(9)
    seqs, tasks = [], []
    for i in range(8):
        adapter = None if i == 7 else adapters[i % 3]
        seqs.append(Sequence([rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))],
                             SamplingParams(max_new_tokens=rng.randint(3, 9), ignore_eos=True),
                             adapter.prefix if adapter else None))
        tasks.append(adapter)
    engine = Engine(base, EngineConfig(max_batch_size=5, max_step_tokens=7))
    run_staggered(engine, seqs, [0, 0, 0, 1, 2, 3, 5, 6])
    check_against_oracle(base, adapters, seqs, tasks, near_tie=HALF_NEAR_TIE[dtype])


@pytest.mark.parametrize(("model_type", "nearest"), [
    ("chatglm", "glm4"),  # THUDM's remote-code name for what transformers calls glm4
    ("gemma3", "gemma3_text"),  # the multimodal wrapper of the served text model
    ("starcoder", "starcoder2"),
    ("qwen2_vl", "qwen2"),
])
def test_unsupported_family_is_refused_naming_the_nearest(model_type, nearest):
    assert model_type not in SUPPORTED_MODEL_TYPES
    with pytest.raises(UnsupportedModel, match=f"nearest supported family is '{nearest}'"):
        check_supported(SimpleNamespace(model_type=model_type))


def test_unknown_layer_kind_is_refused():
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        check_supported(SimpleNamespace(model_type="qwen3",
                                        layer_types=["full_attention", "chunked_attention"]))


@pytest.mark.parametrize("kwargs",
                         [{"s_aux": torch.zeros(4)}, {"sinks": torch.zeros(4)}, {"is_causal": False}])
def test_attention_options_it_cannot_honour_are_refused(kwargs):
    q = k = v = torch.zeros(1, 4, 3, 16)
    with pytest.raises(UnsupportedAttention, match=next(iter(kwargs))):
        packed_attention(torch.nn.Identity(), q, k, v, None, **kwargs)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen3"])
def test_sliding_window_no_longer_caps_the_context(arch, tokenizer):
    base = wrap_model(tiny_model(arch), tokenizer, arch)
    assert base.model.config.sliding_window == WINDOW
    assert base.shape.max_positions == TINY_CONFIGS[arch]().max_position_embeddings == 512


def test_multi_query_falcon_against_peft_sized_for_one_head(tokenizer, tmp_path):
    """Falcon-7B's multi-query layout caches one key/value head, but FalconConfig names no
    ``num_key_value_heads``, so PEFT's default prefix (one per attention head) cannot even be concatenated to
    Falcon's cache. The reference is PEFT told the real layout (``num_attention_heads=1``,
    ``token_dim=head_dim``), saved and served as an ordinary PEFT adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, FalconConfig

    torch.manual_seed(1)
    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          multi_query=True, alibi=False, bias=False, max_position_embeddings=512,
                          initializer_range=0.3)
    config._attn_implementation = "sdpa"
    base = wrap_model(AutoModelForCausalLM.from_config(config).eval(), tokenizer, "falcon-7b-like")
    assert (base.shape.num_kv_heads, base.shape.head_dim) == (1, 16)
    reference = copy.deepcopy(base.model)
    peft_adapter(copy.deepcopy(base.model), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, num_attention_heads=1, token_dim=16), tmp_path / "mq",
        seed=None, scale=2.0)
    oracle = PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "mq").eval()
    prefix = ResidentPrefix.unstored("mq", parse_artifact(read_dir(tmp_path / "mq"), base.shape))
    rng = random.Random(5)
    seqs = [Sequence([rng.randrange(VOCAB) for _ in range(n)],
                     SamplingParams(max_new_tokens=6, ignore_eos=True), prefix if n != 4 else None)
            for n in (3, 9, 4, 1)]
    run_staggered(Engine(base, EngineConfig(max_batch_size=4, max_step_tokens=5)), seqs, [0, 0, 1, 2])
    changed = False
    for seq in seqs:
        model = oracle if seq.prefix is not None else reference
        assert_oracle_tokens(model, seq.prompt_ids, seq.output_ids, "falcon-mq")
        if seq.prefix is not None:
            without = oracle_logits(reference, seq.prompt_ids, seq.output_ids).argmax(-1)
            changed |= bool((without != torch.tensor(seq.output_ids)).any())
    assert changed, "the prefix never changed a token"


def test_falcon_with_alibi_is_refused(tokenizer):
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, alibi=True))
    with pytest.raises(UnsupportedModel, match="ALiBi"):
        wrap_model(model, tokenizer, "falcon-rw")


@pytest.mark.parametrize("arch", ["gemma2", "mistral", "falcon"])
def test_outside_a_packed_forward_the_model_computes_as_before(arch, tokenizer):
    """Once an Engine has routed the model's attention, a plain forward (another thread, the benchmark's
    baseline) still computes what the model did before: soft-capped (gemma2), windowed (mistral), and through
    the rerouted Falcon attention."""
    base = wrap_model(tiny_model(arch), tokenizer, arch)
    reference = copy.deepcopy(base.model)
    Engine(base)
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = base.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
