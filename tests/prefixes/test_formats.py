"""Upload formats -> canonical PrefixArtifact, checked against the code that produced the files.

Every PEFT folder here is written by real PEFT (``get_peft_model`` + ``save_pretrained``) on a tiny random
model, and the expected tensors come from PEFT itself (``get_prompt``), not from prefix-serve's own code.
ChatGLM P-Tuning v2 checkpoints are state dicts of a module built like THUDM's ``PrefixEncoder``; their
expected layout is the reshape ChatGLM's ``get_prompt`` does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from prefixes.artifact import (
    ModelShape,
    PrefixArtifact,
    PrefixKind,
    flatten_prefix,
    unflatten_prefix,
)
from prefixes.formats import (
    InvalidArtifact,
    from_own_format,
    parse_artifact,
    to_own_format,
)
from prefixes.validate import ArtifactLimits, validate_artifact
from tests.helpers.adapters import peft_adapter, peft_config, read_dir

# Tiny Llama with grouped-query attention: 4 query heads, 2 KV heads, head_dim 16.
LLAMA_SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, max_positions=256,
                         model_type="llama")
# Tiny GPT-2: plain multi-head attention, 4 heads of 16.
GPT2_SHAPE = ModelShape(num_layers=2, num_kv_heads=4, head_dim=16, hidden_size=64, max_positions=256,
                        model_type="gpt2")
P = 5  # virtual tokens


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    kwargs.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kwargs)).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                       n_positions=256)).eval()


def save_peft(base: torch.nn.Module, kind: str, out: Path, *, safe: bool = True):
    """This module's PEFT folders: P virtual tokens, 24-wide encoders, N(0, 1) noise on PEFT's init; returns
    (peft_model, files)."""
    return peft_adapter(base, peft_config(kind, P, encoder_hidden_size=24), out, seed=1, safe=safe)


def peft_kv_layers(peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's own per-layer prefix keys and values, each [Hkv, P, D], from get_prompt(batch_size=1)."""
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    if hasattr(cache, "layers"):  # transformers 5 DynamicCache
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return [(k[0], v[0]) for k, v in cache]  # legacy tuple of (key, value)


# ---------------------------------------------------------------------------------------------------------
# PEFT folders


@pytest.mark.parametrize("kind", ["prefix", "prefix_projection"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_prefix_tuning_matches_peft_get_prompt(tmp_path, kind, arch):
    base, shape = (tiny_llama(), LLAMA_SHAPE) if arch == "llama" else (tiny_gpt2(), GPT2_SHAPE)
    peft_model, files = save_peft(base, kind, tmp_path / "adapter")
    assert json.loads(files["adapter_config.json"])["peft_type"] == "PREFIX_TUNING"

    artifact = parse_artifact(files, shape)

    assert artifact.kind is PrefixKind.PREFIX_TUNING
    assert artifact.source_format == "peft"
    assert artifact.metadata["peft_type"] == "PREFIX_TUNING"
    assert artifact.num_virtual_tokens == P
    assert tuple(artifact.tensor.shape) == (shape.num_layers, 2, shape.num_kv_heads, P, shape.head_dim)

    layers = peft_kv_layers(peft_model)
    assert len(layers) == shape.num_layers
    for i, (key, value) in enumerate(layers):
        assert tuple(key.shape) == (shape.num_kv_heads, P, shape.head_dim)
        torch.testing.assert_close(artifact.tensor[i, 0], key, rtol=1e-6, atol=1e-6, msg=f"layer {i} key")
        torch.testing.assert_close(artifact.tensor[i, 1], value, rtol=1e-6, atol=1e-6, msg=f"layer {i} value")
    # keys and values really differ, so a swapped k/v or layer order could not pass the loop above
    assert not torch.equal(layers[0][0], layers[0][1])
    assert not torch.equal(layers[0][0], layers[1][0])
    validate_artifact(artifact, shape, ArtifactLimits())


def test_peft_prefix_tuning_bin_weights(tmp_path):
    """An adapter saved with safe_serialization=False (adapter_model.bin) parses like the safetensors one."""
    peft_model, files = save_peft(tiny_llama(), "prefix", tmp_path / "adapter", safe=False)
    assert "adapter_model.bin" in files and "adapter_model.safetensors" not in files

    artifact = parse_artifact(files, LLAMA_SHAPE)

    assert artifact.kind is PrefixKind.PREFIX_TUNING
    for i, (key, value) in enumerate(peft_kv_layers(peft_model)):
        torch.testing.assert_close(artifact.tensor[i, 0], key)
        torch.testing.assert_close(artifact.tensor[i, 1], value)


@pytest.mark.parametrize(
    "kind, expected_kind, peft_type",
    [
        ("p_tuning_mlp", PrefixKind.P_TUNING, "P_TUNING"),
        ("p_tuning_lstm", PrefixKind.P_TUNING, "P_TUNING"),
        ("prompt_tuning", PrefixKind.PROMPT_TUNING, "PROMPT_TUNING"),
    ],
)
def test_peft_soft_prompt_matches_peft_get_prompt(tmp_path, kind, expected_kind, peft_type):
    peft_model, files = save_peft(tiny_llama(), kind, tmp_path / "adapter")

    artifact = parse_artifact(files, LLAMA_SHAPE)

    assert artifact.kind is expected_kind
    assert not artifact.kind.is_deep
    assert artifact.metadata["peft_type"] == peft_type
    assert artifact.tensor_name == "prompt_embeddings"
    assert tuple(artifact.tensor.shape) == (P, LLAMA_SHAPE.hidden_size)
    with torch.no_grad():
        expected = peft_model.get_prompt(batch_size=1)[0]  # the encoder's output, what PEFT feeds the model
    assert expected.abs().mean() > 0.1  # a real signal, so the tolerance below is tight by comparison
    # PEFT computes the saved tensor and get_prompt's in separate (LSTM: differently batched) passes.
    torch.testing.assert_close(artifact.tensor, expected, rtol=1e-4, atol=1e-4)
    validate_artifact(artifact, LLAMA_SHAPE, ArtifactLimits())


def test_flatten_unflatten_round_trip():
    torch.manual_seed(0)
    flat = torch.randn(7, LLAMA_SHAPE.kv_width)
    kv = unflatten_prefix(flat, LLAMA_SHAPE)
    assert tuple(kv.shape) == (2, 2, 2, 7, 16)
    assert torch.equal(flatten_prefix(kv), flat)
    assert torch.equal(unflatten_prefix(flatten_prefix(kv), LLAMA_SHAPE), kv)
    # The documented layout: row 2*layer+k of the (L*2, Hkv, D) view of a token's flat vector.
    token, layer, kv_idx, head = 3, 1, 1, 0
    row = flat[token].view(LLAMA_SHAPE.num_layers * 2, LLAMA_SHAPE.num_kv_heads, LLAMA_SHAPE.head_dim)
    assert torch.equal(kv[layer, kv_idx, head, token], row[2 * layer + kv_idx, head])


# ---------------------------------------------------------------------------------------------------------
# ChatGLM-6B P-Tuning v2


class ChatGLMPrefixEncoder(torch.nn.Module):
    """Shaped like THUDM's ChatGLM ``PrefixEncoder``: an embedding, optionally followed by the
    ``trans`` Linear-Tanh-Linear MLP (``prefix_projection``)."""

    def __init__(self, pre_seq_len: int, width: int, projection: tuple[int, int] | None = None):
        super().__init__()
        self.prefix_projection = projection is not None
        if projection is None:
            self.embedding = torch.nn.Embedding(pre_seq_len, width)
        else:
            embed_dim, hidden = projection
            self.embedding = torch.nn.Embedding(pre_seq_len, embed_dim)
            self.trans = torch.nn.Sequential(
                torch.nn.Linear(embed_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, width)
            )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


def chatglm_get_prompt(encoder: ChatGLMPrefixEncoder, shape: ModelShape) -> list[torch.Tensor]:
    """ChatGLM's ``get_prompt`` for batch 1: per layer a [2, Hkv, P, D] (key, value) tensor."""
    p = encoder.embedding.num_embeddings
    with torch.no_grad():
        pkv = encoder(torch.arange(p).unsqueeze(0))
    pkv = pkv.view(1, p, shape.num_layers * 2, shape.num_kv_heads, shape.head_dim)
    return [chunk[:, 0] for chunk in pkv.permute([2, 0, 3, 1, 4]).split(2)]


def chatglm_state(encoder: ChatGLMPrefixEncoder, prefix: str = "transformer.prefix_encoder.") -> dict:
    return {prefix + k: v.detach().clone() for k, v in encoder.state_dict().items()}


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_chatglm_bare_embedding(container):
    torch.manual_seed(3)
    encoder = ChatGLMPrefixEncoder(P, LLAMA_SHAPE.kv_width)
    state = chatglm_state(encoder)
    assert set(state) == {"transformer.prefix_encoder.embedding.weight"}
    files = ({"model.safetensors": safetensors.torch.save(state)} if container == "safetensors"
             else {"pytorch_model.bin": torch_save_bytes(state)})

    artifact = parse_artifact(files, LLAMA_SHAPE)

    assert artifact.kind is PrefixKind.PREFIX_TUNING
    assert artifact.source_format == "chatglm"
    assert artifact.metadata == {"prefix_projection": "False"}
    assert tuple(artifact.tensor.shape) == (2, 2, 2, P, 16)
    assert torch.equal(flatten_prefix(artifact.tensor), encoder.embedding.weight.detach())
    for i, layer in enumerate(chatglm_get_prompt(encoder, LLAMA_SHAPE)):
        assert torch.equal(artifact.tensor[i], layer)


@pytest.mark.parametrize("container", ["safetensors", "bin"])
@pytest.mark.parametrize("key_prefix", ["transformer.prefix_encoder.", "prefix_encoder."])
def test_chatglm_prefix_projection_is_folded(container, key_prefix):
    torch.manual_seed(4)
    embed_dim, hidden = 40, 24  # deliberately unlike the model's sizes: [P, E], [Hp, E], [W, Hp]
    encoder = ChatGLMPrefixEncoder(P, LLAMA_SHAPE.kv_width, projection=(embed_dim, hidden))
    state = chatglm_state(encoder, key_prefix)
    assert {k[len(key_prefix):]: tuple(v.shape) for k, v in state.items()} == {
        "embedding.weight": (P, embed_dim),
        "trans.0.weight": (hidden, embed_dim),
        "trans.0.bias": (hidden,),
        "trans.2.weight": (LLAMA_SHAPE.kv_width, hidden),
        "trans.2.bias": (LLAMA_SHAPE.kv_width,),
    }
    files = ({"adapter.safetensors": safetensors.torch.save(state)} if container == "safetensors"
             else {"pytorch_model.bin": torch_save_bytes(state)})

    artifact = parse_artifact(files, LLAMA_SHAPE)

    assert artifact.kind is PrefixKind.PREFIX_TUNING
    assert artifact.source_format == "chatglm"
    assert artifact.metadata == {"prefix_projection": "True"}
    with torch.no_grad():
        expected_flat = encoder.trans(encoder.embedding.weight)  # nn.Sequential(Linear, Tanh, Linear)
    torch.testing.assert_close(flatten_prefix(artifact.tensor), expected_flat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(artifact.tensor, unflatten_prefix(expected_flat, LLAMA_SHAPE), rtol=1e-6,
                               atol=1e-6)
    for i, layer in enumerate(chatglm_get_prompt(encoder, LLAMA_SHAPE)):
        torch.testing.assert_close(artifact.tensor[i], layer, rtol=1e-6, atol=1e-6)


def test_chatglm_fp16_checkpoint_is_served_as_float():
    torch.manual_seed(5)
    encoder = ChatGLMPrefixEncoder(P, LLAMA_SHAPE.kv_width).half()
    artifact = parse_artifact({"pytorch_model.bin": torch_save_bytes(chatglm_state(encoder))}, LLAMA_SHAPE)
    assert artifact.tensor.dtype == torch.float32
    assert torch.equal(flatten_prefix(artifact.tensor), encoder.embedding.weight.detach().float())


def test_chatglm_incomplete_mlp_refused():
    encoder = ChatGLMPrefixEncoder(P, LLAMA_SHAPE.kv_width, projection=(40, 24))
    state = chatglm_state(encoder)
    del state["transformer.prefix_encoder.trans.2.bias"]
    with pytest.raises(InvalidArtifact,
                       match=r"prefix_projection MLP is incomplete, missing \['trans.2.bias'\]"):
        parse_artifact({"m.safetensors": safetensors.torch.save(state)}, LLAMA_SHAPE)


def test_chatglm_mlp_that_does_not_chain_refused():
    encoder = ChatGLMPrefixEncoder(P, LLAMA_SHAPE.kv_width, projection=(40, 24))
    state = chatglm_state(encoder)
    state["transformer.prefix_encoder.trans.2.weight"] = torch.randn(LLAMA_SHAPE.kv_width, 23)
    with pytest.raises(InvalidArtifact, match="MLP shapes do not chain"):
        parse_artifact({"m.safetensors": safetensors.torch.save(state)}, LLAMA_SHAPE)


def test_chatglm_without_embedding_refused():
    state = {"transformer.prefix_encoder.trans.0.weight": torch.randn(4, 4)}
    with pytest.raises(InvalidArtifact, match="without 'transformer.prefix_encoder.embedding.weight'"):
        parse_artifact({"m.safetensors": safetensors.torch.save(state)}, LLAMA_SHAPE)


# ---------------------------------------------------------------------------------------------------------
# prefix-serve's own format


def _artifacts() -> list[PrefixArtifact]:
    torch.manual_seed(6)
    return [
        PrefixArtifact(PrefixKind.PREFIX_TUNING, torch.randn(2, 2, 2, P, 16), "peft",
                       {"peft_type": "PREFIX_TUNING"}),
        PrefixArtifact(PrefixKind.PREFIX_TUNING, torch.randn(2, 2, 2, P, 16).to(torch.bfloat16), "chatglm",
                       {"prefix_projection": "True"}),
        PrefixArtifact(PrefixKind.P_TUNING, torch.randn(P, 64).half(), "peft", {"peft_type": "P_TUNING"}),
        PrefixArtifact(PrefixKind.PROMPT_TUNING, torch.randn(3, 64), "peft", {}),
    ]


@pytest.mark.parametrize("index", range(4))
def test_own_format_round_trip(index):
    original = _artifacts()[index]
    data = to_own_format(original)

    back = from_own_format(data)
    assert back.kind is original.kind
    assert back.source_format == original.source_format
    assert back.metadata == original.metadata
    assert back.tensor.dtype == original.tensor.dtype
    assert torch.equal(back.tensor, original.tensor)
    assert back.sha256() == original.sha256()

    # Re-uploading the exported single file is accepted as prefix-serve's own format.
    parsed = parse_artifact({"task.safetensors": data}, LLAMA_SHAPE)
    assert parsed.kind is original.kind
    assert parsed.source_format == "prefix-serve"
    assert torch.equal(parsed.tensor, original.tensor)
    assert parsed.sha256() == original.sha256()
    assert "format" not in parsed.metadata and "kind" not in parsed.metadata


def test_own_format_of_a_parsed_peft_adapter(tmp_path):
    peft_model, files = save_peft(tiny_llama(), "prefix_projection", tmp_path / "adapter")
    artifact = parse_artifact(files, LLAMA_SHAPE)
    back = parse_artifact({"exported.safetensors": to_own_format(artifact)}, LLAMA_SHAPE)
    assert torch.equal(back.tensor, artifact.tensor)
    for i, (key, value) in enumerate(peft_kv_layers(peft_model)):
        torch.testing.assert_close(back.tensor[i, 0], key)
        torch.testing.assert_close(back.tensor[i, 1], value)


def test_own_format_bad_kind_and_bad_tensor_name_refused():
    data = safetensors.torch.save({"past_key_values": torch.zeros(2, 2, 2, 1, 16)},
                                  metadata={"format": "prefix-serve", "kind": "lora"})
    with pytest.raises(InvalidArtifact, match="metadata kind 'lora' must be one of"):
        parse_artifact({"x.safetensors": data}, LLAMA_SHAPE)
    data = safetensors.torch.save({"prompt_embeddings": torch.zeros(1, 64)},
                                  metadata={"format": "prefix-serve", "kind": "prefix_tuning"})
    with pytest.raises(InvalidArtifact, match="holds exactly one tensor 'past_key_values'"):
        from_own_format(data)


# ---------------------------------------------------------------------------------------------------------
# Refusals


class _TouchOnUnpickle:
    """A pickle payload: unpickling it calls ``open(path, 'w')``, creating the marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    control_marker, marker = tmp_path / "control-ran", tmp_path / "payload-ran"
    # Control: the payload is live; an unsafe load really runs it.
    torch.load(io.BytesIO(torch_save_bytes({"x": _TouchOnUnpickle(control_marker)})), weights_only=False)
    assert control_marker.exists()

    payload = torch_save_bytes({"transformer.prefix_encoder.embedding.weight": _TouchOnUnpickle(marker)})
    with pytest.raises(InvalidArtifact, match=r"refused: it is not a plain tensor checkpoint") as exc:
        parse_artifact({"pytorch_model.bin": payload}, LLAMA_SHAPE)
    assert "safetensors" in str(exc.value)
    assert not marker.exists()

    # Same payload as the weights of a PEFT folder.
    config = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}).encode()
    with pytest.raises(InvalidArtifact, match="refused"):
        parse_artifact({"adapter_config.json": config, "adapter_model.bin": payload}, LLAMA_SHAPE)
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict_refused():
    with pytest.raises(InvalidArtifact, match="expected a dict of tensor name -> tensor, got list"):
        parse_artifact({"pytorch_model.bin": torch_save_bytes([torch.zeros(2)])}, LLAMA_SHAPE)


def test_wrong_layer_count_peft_refused(tmp_path):
    _, files = save_peft(tiny_llama(num_hidden_layers=3), "prefix", tmp_path / "adapter")
    with pytest.raises(InvalidArtifact, match="num_layers=3 but the base model has 2 layers"):
        parse_artifact(files, LLAMA_SHAPE)


def test_wrong_layer_count_without_config_hint_refused():
    three_layers = 3 * 2 * LLAMA_SHAPE.num_kv_heads * LLAMA_SHAPE.head_dim
    state = {"transformer.prefix_encoder.embedding.weight": torch.randn(P, three_layers)}
    with pytest.raises(InvalidArtifact, match=r"prefix width 192 != .* = 128 .*that is 3 layers"):
        parse_artifact({"m.safetensors": safetensors.torch.save(state)}, LLAMA_SHAPE)


def test_wrong_kv_width_refused(tmp_path):
    # Same layer count, but head_dim 12 (hidden 48 / 4 heads): width 2*2*2*12 = 96 instead of 128.
    _, files = save_peft(tiny_llama(hidden_size=48), "prefix", tmp_path / "adapter")
    with pytest.raises(InvalidArtifact, match=r"prefix width 96 != num_layers\(2\) x 2 x kv_heads\(2\) x "
                                              r"head_dim\(16\) = 128") as exc:
        parse_artifact(files, LLAMA_SHAPE)
    assert "does not match this model's heads and head size" in str(exc.value)


def test_soft_prompt_wrong_hidden_size_refused(tmp_path):
    _, files = save_peft(tiny_llama(hidden_size=48), "prompt_tuning", tmp_path / "adapter")
    with pytest.raises(InvalidArtifact, match="soft prompt width 48 != the base model's hidden size 64"):
        parse_artifact(files, LLAMA_SHAPE)


def _prompt_tuning_files(tmp_path) -> dict[str, bytes]:
    _, files = save_peft(tiny_llama(), "prompt_tuning", tmp_path / "adapter")
    return files


@pytest.mark.parametrize("broken, message", [
    (b"{not json", "adapter_config.json is not valid JSON"),
    (b"\xff\xfe\x00", "adapter_config.json is not valid JSON"),
    (b"[1, 2]", "adapter_config.json must be a JSON object"),
])
def test_broken_adapter_config_refused(tmp_path, broken, message):
    files = _prompt_tuning_files(tmp_path)
    files["adapter_config.json"] = broken
    with pytest.raises(InvalidArtifact, match=message):
        parse_artifact(files, LLAMA_SHAPE)


def test_adapter_config_without_weights_refused(tmp_path):
    files = _prompt_tuning_files(tmp_path)
    del files["adapter_model.safetensors"]
    with pytest.raises(InvalidArtifact,
                       match="PEFT adapter without weights: upload adapter_model.safetensors"):
        parse_artifact(files, LLAMA_SHAPE)


def test_weights_without_prompt_embeddings_refused(tmp_path):
    files = _prompt_tuning_files(tmp_path)
    files["adapter_model.safetensors"] = safetensors.torch.save({"base_model.embed.weight": torch.zeros(P,
                                                                                                        64)})
    with pytest.raises(InvalidArtifact,
                       match=r"no 'prompt_embeddings' tensor \(found \['base_model.embed.weight'\]\)"):
        parse_artifact(files, LLAMA_SHAPE)


def test_lora_adapter_refused(tmp_path):
    model = get_peft_model(tiny_llama(),
                           LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "lora")
    files = read_dir(tmp_path / "lora")
    with pytest.raises(InvalidArtifact, match="peft_type 'LORA' is not served here"):
        parse_artifact(files, LLAMA_SHAPE)


def test_num_virtual_tokens_mismatch_refused(tmp_path):
    files = _prompt_tuning_files(tmp_path)
    config = json.loads(files["adapter_config.json"])
    config["num_virtual_tokens"] = P + 4
    files["adapter_config.json"] = json.dumps(config).encode()
    with pytest.raises(InvalidArtifact,
                       match=f"num_virtual_tokens={P + 4} but prompt_embeddings has {P} rows"):
        parse_artifact(files, LLAMA_SHAPE)


@pytest.mark.parametrize("field, value, message", [
    ("task_type", "SEQ_2_SEQ_LM", "only CAUSAL_LM adapters"),
    ("num_transformer_submodules", 2, "num_transformer_submodules must be 1"),
])
def test_peft_config_for_another_model_type_refused(tmp_path, field, value, message):
    files = _prompt_tuning_files(tmp_path)
    config = json.loads(files["adapter_config.json"])
    config[field] = value
    files["adapter_config.json"] = json.dumps(config).encode()
    with pytest.raises(InvalidArtifact, match=message):
        parse_artifact(files, LLAMA_SHAPE)


@pytest.mark.parametrize("field, value",
                         [("num_virtual_tokens", "five"), ("num_transformer_submodules", [1])])
def test_non_integer_config_values_refused_as_invalid_artifact(tmp_path, field, value):
    files = _prompt_tuning_files(tmp_path)
    config = json.loads(files["adapter_config.json"])
    config[field] = value
    files["adapter_config.json"] = json.dumps(config).encode()
    try:
        parse_artifact(files, LLAMA_SHAPE)
    except InvalidArtifact:
        return
    pytest.fail("a config with a non-integer value was accepted")


def test_no_files_refused():
    with pytest.raises(InvalidArtifact, match="No files were uploaded"):
        parse_artifact({}, LLAMA_SHAPE)


def test_no_tensor_file_refused():
    with pytest.raises(InvalidArtifact, match=r"No tensor file among \['README.md'\]"):
        parse_artifact({"README.md": b"# hi"}, LLAMA_SHAPE)


def test_two_tensor_files_refused():
    data = to_own_format(_artifacts()[0])
    with pytest.raises(InvalidArtifact, match=r"Several tensor files \['a.safetensors', 'b.bin'\]"):
        parse_artifact({"a.safetensors": data, "b.bin": data, "README.md": b""}, LLAMA_SHAPE)


def test_peft_weights_without_config_refused(tmp_path):
    files = _prompt_tuning_files(tmp_path)
    del files["adapter_config.json"]
    with pytest.raises(InvalidArtifact, match="unrecognised tensors .* also needs its adapter_config.json"):
        parse_artifact(files, LLAMA_SHAPE)


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "short"])
def test_corrupt_safetensors_refused(corrupt):
    good = to_own_format(_artifacts()[0])
    data = {"garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64,
            "truncated": good[: len(good) // 2],
            "short": b"abc"}[corrupt]
    with pytest.raises(InvalidArtifact, match="task.safetensors: not a readable safetensors file"):
        parse_artifact({"task.safetensors": data}, LLAMA_SHAPE)


def test_corrupt_peft_safetensors_refused(tmp_path):
    files = _prompt_tuning_files(tmp_path)
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:-10]
    with pytest.raises(InvalidArtifact, match="adapter_model.safetensors: not a readable safetensors file"):
        parse_artifact(files, LLAMA_SHAPE)


# ---------------------------------------------------------------------------------------------------------
# validate_artifact


def _deep(p: int = P, shape: ModelShape = LLAMA_SHAPE) -> PrefixArtifact:
    torch.manual_seed(7)
    return PrefixArtifact(PrefixKind.PREFIX_TUNING,
                          torch.randn(shape.num_layers, 2, shape.num_kv_heads, p, shape.head_dim), "peft")


def _soft(p: int = P) -> PrefixArtifact:
    torch.manual_seed(8)
    return PrefixArtifact(PrefixKind.P_TUNING, torch.randn(p, LLAMA_SHAPE.hidden_size), "peft")


def test_validate_accepts_good_artifacts(tmp_path):
    assert validate_artifact(_deep(), LLAMA_SHAPE, ArtifactLimits()) is None
    assert validate_artifact(_soft(), LLAMA_SHAPE, ArtifactLimits()) is None
    parsed = parse_artifact(_prompt_tuning_files(tmp_path), LLAMA_SHAPE)
    assert validate_artifact(parsed, LLAMA_SHAPE, ArtifactLimits()) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("make", [_deep, _soft])
def test_validate_refuses_non_finite(make, bad):
    artifact = make()
    flat = artifact.tensor.view(-1)
    flat[3] = bad
    flat[10] = bad
    with pytest.raises(InvalidArtifact, match=f"{artifact.tensor_name}: 2 values are NaN or infinite"):
        validate_artifact(artifact, LLAMA_SHAPE, ArtifactLimits())


def test_validate_refuses_too_many_virtual_tokens():
    with pytest.raises(InvalidArtifact, match="num_virtual_tokens=5: must be between 1 and 4"):
        validate_artifact(_deep(5), LLAMA_SHAPE, ArtifactLimits(max_virtual_tokens=4))
    with pytest.raises(InvalidArtifact, match="num_virtual_tokens=5: must be between 1 and 4"):
        validate_artifact(_soft(5), LLAMA_SHAPE, ArtifactLimits(max_virtual_tokens=4))
    validate_artifact(_soft(4), LLAMA_SHAPE, ArtifactLimits(max_virtual_tokens=4))  # the limit itself is fine
    # The base model's context bounds it too: a prefix must leave room for at least one prompt token.
    short = ModelShape(2, 2, 16, 64, max_positions=5)
    with pytest.raises(InvalidArtifact, match="num_virtual_tokens=5: must be between 1 and 4"):
        validate_artifact(_deep(5, short), short, ArtifactLimits())
    with pytest.raises(InvalidArtifact, match="num_virtual_tokens=0: must be between 1 and"):
        validate_artifact(_soft(0), LLAMA_SHAPE, ArtifactLimits())


def test_validate_refuses_wrong_shape_and_dtype():
    gpt2_prefix = _deep(shape=GPT2_SHAPE)
    with pytest.raises(InvalidArtifact,
                       match=r"shape \(2, 2, 4, 5, 16\) does not fit the base model; expected "
                             r"\[num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim\] = "
                             r"\(2, 2, 2, 5, 16\)"):
        validate_artifact(gpt2_prefix, LLAMA_SHAPE, ArtifactLimits())
    wide = PrefixArtifact(PrefixKind.PROMPT_TUNING, torch.zeros(P, 65), "peft")
    with pytest.raises(InvalidArtifact, match=r"expected \[num_virtual_tokens, hidden_size\] = \(5, 64\)"):
        validate_artifact(wide, LLAMA_SHAPE, ArtifactLimits())
    ints = PrefixArtifact(PrefixKind.PROMPT_TUNING, torch.zeros(P, 64, dtype=torch.int32), "peft")
    with pytest.raises(InvalidArtifact, match="dtype torch.int32 is not a float type"):
        validate_artifact(ints, LLAMA_SHAPE, ArtifactLimits())


@pytest.mark.parametrize("kind, name, tensor", [
    ("prefix_tuning", "past_key_values", torch.zeros(7)),
    ("p_tuning", "prompt_embeddings", torch.tensor(1.0)),
])
def test_own_format_with_too_few_dims_refused_as_invalid_artifact(kind, name, tensor):
    data = safetensors.torch.save({name: tensor}, metadata={"format": "prefix-serve", "kind": kind})
    with pytest.raises(InvalidArtifact):
        artifact = parse_artifact({"task.safetensors": data}, LLAMA_SHAPE)
        validate_artifact(artifact, LLAMA_SHAPE, ArtifactLimits())
