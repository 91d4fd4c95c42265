"""Reading uploaded prefix artifacts into the canonical :class:`PrefixArtifact`.

Accepted, detected from the files themselves:

- a PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``), tensor
  ``prompt_embeddings``; ``peft_type`` PREFIX_TUNING, P_TUNING or PROMPT_TUNING. PEFT saves the output of
  its prompt encoder, so any reparameterisation is already folded in.
- a THUDM ChatGLM P-Tuning v2 checkpoint: tensors under ``transformer.prefix_encoder.``
  (``embedding.weight`` and, when trained with ``prefix_projection``, ``trans.0.*`` / ``trans.2.*``, the
  Linear-Tanh-Linear MLP, which is run here once). ChatGLM-6B sizes a virtual token as
  ``num_layers * 2 * hidden_size``; ChatGLM2/3 and GLM-4 use multi-query attention and size it
  ``num_layers * 2 * multi_query_group_num * kv_channels``, which on transformers' GLM-4 (``glm4``) is
  ``num_layers * 2 * num_key_value_heads * head_dim``: the base model's key/value width, as for PEFT.
- prefix-serve's own format: one ``.safetensors`` file with metadata ``format = prefix-serve``.

Tensors are read from ``.safetensors`` or, for ``.bin``/``.pt``, only through
``torch.load(weights_only=True)``, which refuses any pickle that is not plain tensors and containers.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping

import safetensors.torch
import torch

from prefixes.artifact import (
    EMBEDDING_TENSOR,
    KV_TENSOR,
    ModelShape,
    PrefixArtifact,
    PrefixKind,
    unflatten_prefix,
)

OWN_FORMAT = "prefix-serve"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHATGLM_PREFIX = "transformer.prefix_encoder."
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class InvalidArtifact(ValueError):
    """An upload that cannot be served; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------
# Safe tensor readers


def read_safetensors(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = safetensors.torch.load(data)
        (header_len,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # the library raises several unrelated types for corrupt input
        raise InvalidArtifact(f"{name}: not a readable safetensors file ({exc}).") from exc
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_torch_weights(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` state dict without ever executing pickled code (``weights_only=True``)."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArtifact(
            f"{name}: refused: it is not a plain tensor checkpoint that torch.load(weights_only=True) "
            "accepts (arbitrary pickles are never loaded here). Save it with safetensors instead. "
            f"Detail: {exc}"
        ) from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidArtifact(f"{name}: expected a dict of tensor name -> tensor, got {type(obj).__name__}.")
    return {str(k): v for k, v in obj.items()}


def read_tensors(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if name.endswith(".safetensors"):
        return read_safetensors(data, name)
    return read_torch_weights(data, name), {}


# ---------------------------------------------------------------------------------------------------------
# Format detection and conversion


def parse_artifact(files: Mapping[str, bytes], shape: ModelShape) -> PrefixArtifact:
    """Turn the files of one upload (name -> bytes) into a canonical artifact for the model ``shape``.

    Only shapes are checked here; :func:`prefixes.validate.validate_artifact` checks the rest.
    """
    if not files:
        raise InvalidArtifact(
            "No files were uploaded: send the artifact's files in the multipart field `files`."
        )
    if PEFT_CONFIG in files:
        return _parse_peft(files, shape)
    tensor_files = [n for n in files if n.endswith(TENSOR_SUFFIXES)]
    if not tensor_files:
        raise InvalidArtifact(
            f"No tensor file among {sorted(files)}. Upload a PEFT adapter folder ({PEFT_CONFIG} + "
            f"{PEFT_WEIGHTS[0]}), a ChatGLM P-Tuning v2 checkpoint (pytorch_model.bin or .safetensors with "
            f"'{CHATGLM_PREFIX}*' tensors) or a prefix-serve .safetensors file."
        )
    if len(tensor_files) > 1:
        raise InvalidArtifact(f"Several tensor files {sorted(tensor_files)}: upload exactly one per task.")
    name = tensor_files[0]
    tensors, metadata = read_tensors(files[name], name)
    if metadata.get("format") == OWN_FORMAT:
        return _parse_own(tensors, metadata, name)
    if any(k.startswith((CHATGLM_PREFIX, "prefix_encoder.")) for k in tensors):
        return _parse_chatglm(tensors, shape, name)
    raise InvalidArtifact(
        f"{name}: unrecognised tensors {sorted(tensors)[:5]}. A PEFT adapter also needs its {PEFT_CONFIG}; a "
        f"ChatGLM checkpoint has '{CHATGLM_PREFIX}embedding.weight'; a prefix-serve file has metadata "
        f"format={OWN_FORMAT}."
    )


def _parse_peft(files: Mapping[str, bytes], shape: ModelShape) -> PrefixArtifact:
    try:
        config = json.loads(files[PEFT_CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(f"{PEFT_CONFIG} is not valid JSON ({exc}).") from exc
    except RecursionError:  # the parser's nesting limit: a PEFT config is a flat object
        raise InvalidArtifact(f"{PEFT_CONFIG} is nested too deeply to be a PEFT config (it is a flat JSON "
                              "object of settings).") from None
    if not isinstance(config, dict):
        raise InvalidArtifact(f"{PEFT_CONFIG} must be a JSON object.")
    peft_type = str(config.get("peft_type", "")).upper()
    try:
        kind = {"PREFIX_TUNING": PrefixKind.PREFIX_TUNING, "P_TUNING": PrefixKind.P_TUNING,
                "PROMPT_TUNING": PrefixKind.PROMPT_TUNING}[peft_type]
    except KeyError:
        raise InvalidArtifact(
            f"{PEFT_CONFIG}: peft_type {peft_type or 'missing'!r} is not served here; prefix-serve serves "
            "PREFIX_TUNING, P_TUNING and PROMPT_TUNING adapters."
        ) from None
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise InvalidArtifact(
            f"{PEFT_CONFIG}: task_type {task_type!r}; only CAUSAL_LM adapters fit a causal LM."
        )
    if _config_int(config, "num_transformer_submodules", 1) != 1:
        raise InvalidArtifact(
            f"{PEFT_CONFIG}: num_transformer_submodules must be 1 for a decoder-only model."
        )

    weights = [n for n in PEFT_WEIGHTS if n in files]
    if not weights:
        raise InvalidArtifact(
            f"PEFT adapter without weights: upload {PEFT_WEIGHTS[0]} next to {PEFT_CONFIG}."
        )
    tensors, _ = read_tensors(files[weights[0]], weights[0])
    if EMBEDDING_TENSOR not in tensors:
        raise InvalidArtifact(
            f"{weights[0]}: no '{EMBEDDING_TENSOR}' tensor (found {sorted(tensors)[:5]}); save the adapter "
            "with PeftModel.save_pretrained."
        )
    flat = _as_matrix(tensors[EMBEDDING_TENSOR], f"{weights[0]}:{EMBEDDING_TENSOR}")
    num_virtual_tokens = _config_int(config, "num_virtual_tokens", None)
    if num_virtual_tokens is not None and num_virtual_tokens != flat.shape[0]:
        raise InvalidArtifact(
            f"{PEFT_CONFIG} says num_virtual_tokens={num_virtual_tokens} but {EMBEDDING_TENSOR} has "
            f"{flat.shape[0]} rows: the config and weights come from different adapters."
        )
    metadata = {"peft_type": peft_type}
    if kind.is_deep:
        num_layers = _config_int(config, "num_layers", None)
        if num_layers not in (None, shape.num_layers):
            raise InvalidArtifact(
                f"{PEFT_CONFIG}: num_layers={num_layers} but the base model has {shape.num_layers} "
                "layers: this adapter was trained for another model."
            )
        kv = _unflatten_checked(flat, shape, weights[0])
        return PrefixArtifact(kind, kv, "peft", metadata)
    return PrefixArtifact(kind, _soft_prompt_checked(flat, shape, weights[0]), "peft", metadata)


def _config_int(config: dict, key: str, default: int | None) -> int | None:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArtifact(f"{PEFT_CONFIG}: {key} must be an integer, got {value!r}.")
    return value


def _parse_chatglm(tensors: dict[str, torch.Tensor], shape: ModelShape, name: str) -> PrefixArtifact:
    encoder = {}
    for key, value in tensors.items():
        for prefix in (CHATGLM_PREFIX, "prefix_encoder."):
            if key.startswith(prefix):
                encoder[key[len(prefix):]] = value
    if "embedding.weight" not in encoder:
        raise InvalidArtifact(f"{name}: ChatGLM checkpoint without '{CHATGLM_PREFIX}embedding.weight'.")
    embedding = _as_matrix(encoder["embedding.weight"], f"{name}:embedding.weight").float()
    mlp_keys = ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")
    present = [k for k in mlp_keys if k in encoder]
    if present and len(present) != len(mlp_keys):
        missing = sorted(set(mlp_keys) - set(present))
        raise InvalidArtifact(f"{name}: prefix_projection MLP is incomplete, missing {missing}.")
    if present:
        # The PrefixEncoder's reparameterisation, run once: Linear -> Tanh -> Linear.
        w0, b0, w2, b2 = (encoder[k].float() for k in mlp_keys)
        try:
            with torch.no_grad():
                hidden = torch.tanh(torch.nn.functional.linear(embedding, w0, b0))
                flat = torch.nn.functional.linear(hidden, w2, b2)
        except RuntimeError as exc:
            raise InvalidArtifact(f"{name}: prefix_projection MLP shapes do not chain ({exc}).") from exc
    else:
        flat = embedding
    if flat.shape[1] == shape.num_layers * 2 * shape.hidden_size != shape.kv_width:
        raise InvalidArtifact(
            f"{name}: prefix width {flat.shape[1]} = num_layers({shape.num_layers}) x 2 x hidden_size"
            f"({shape.hidden_size}), the ChatGLM-6B layout with a key/value per attention head, but this "
            f"base model has {shape.num_kv_heads} key/value heads (multi-query groups) of {shape.head_dim}: "
            f"a ChatGLM2/3 or GLM-4 prefix is num_layers x 2 x multi_query_group_num x kv_channels = "
            f"{shape.kv_width}. Was it trained for ChatGLM-6B rather than this model?"
        )
    kv = _unflatten_checked(flat, shape, name)
    return PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "chatglm", {"prefix_projection": str(bool(present))})


def _parse_own(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> PrefixArtifact:
    try:
        kind = PrefixKind(metadata.get("kind", ""))
    except ValueError:
        raise InvalidArtifact(
            f"{name}: metadata kind {metadata.get('kind')!r} must be one of {[k.value for k in PrefixKind]}."
        ) from None
    tensor_name = KV_TENSOR if kind.is_deep else EMBEDDING_TENSOR
    if set(tensors) != {tensor_name}:
        raise InvalidArtifact(f"{name}: a {kind.value} file holds exactly one tensor '{tensor_name}'.")
    tensor = tensors[tensor_name]
    expected_dims = 5 if kind.is_deep else 2
    if tensor.ndim != expected_dims:
        raise InvalidArtifact(
            f"{name}: '{tensor_name}' must have {expected_dims} dimensions, got shape {tuple(tensor.shape)}."
        )
    keep = {k: v for k, v in metadata.items() if k not in ("format", "kind")}
    return PrefixArtifact(kind, tensor, OWN_FORMAT, keep)


def _as_matrix(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.ndim != 2 or not t.is_floating_point():
        raise InvalidArtifact(f"{what}: expected a 2-D float tensor, got shape {tuple(t.shape)} {t.dtype}.")
    return t


def _unflatten_checked(flat: torch.Tensor, shape: ModelShape, name: str) -> torch.Tensor:
    width = flat.shape[1]
    if width != shape.kv_width:
        per_layer = 2 * shape.num_kv_heads * shape.head_dim
        hint = (
            f"that is {width // per_layer} layers of this model's key/value width"
            if width % per_layer == 0
            else "its key/value width per layer does not match this model's heads and head size"
        )
        raise InvalidArtifact(
            f"{name}: prefix width {width} != num_layers({shape.num_layers}) x 2 "
            f"x kv_heads({shape.num_kv_heads}) x head_dim({shape.head_dim}) = {shape.kv_width} for the "
            f"loaded base model; {hint}. Was it trained for another base model?"
        )
    return unflatten_prefix(flat, shape)


def _soft_prompt_checked(flat: torch.Tensor, shape: ModelShape, name: str) -> torch.Tensor:
    if flat.shape[1] != shape.hidden_size:
        raise InvalidArtifact(
            f"{name}: soft prompt width {flat.shape[1]} != the base model's hidden size {shape.hidden_size}; "
            "was it trained for another base model?"
        )
    return flat.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Writers


def to_own_format(artifact: PrefixArtifact) -> bytes:
    """Serialise to prefix-serve's single-file format (also what the store keeps on disk)."""
    metadata = {**artifact.metadata, "format": OWN_FORMAT, "kind": artifact.kind.value,
                "source_format": artifact.source_format}
    return safetensors.torch.save({artifact.tensor_name: artifact.tensor.contiguous()}, metadata=metadata)


def from_own_format(data: bytes, name: str = "prefix.safetensors") -> PrefixArtifact:
    tensors, metadata = read_safetensors(data, name)
    artifact = _parse_own(tensors, metadata, name)
    artifact.source_format = metadata.get("source_format", OWN_FORMAT)
    artifact.metadata.pop("source_format", None)
    return artifact

