"""bfloat16 on CPU at the speed of its instructions: oneDNN-prepacked linear weights, and the start-up dtype.

``F.linear`` on bfloat16 CPU tensors reorders the weight into oneDNN's blocked layout on every call; for a
decode step (a few rows against every weight) that reorder is most of the work, so bfloat16 was no faster
than float32 there even with AVX512-BF16/AMX. Measured on the 2-core Intel Xeon (AMX, one thread), per call,
1 row: 576->1536 274 us -> 79 us, 1536->576 307 -> 58, the 49152-wide head 21.3 ms -> 13.4 ms; 32 rows:
576->1536 297 -> 87 us. So the runner packs each ``nn.Linear`` weight once (:func:`pack_linears`) and calls
oneDNN's linear on the packed copy; the result is the same bfloat16 product with float32 accumulation.

The packed copy is held next to the original weight (which the rest of transformers, tied embeddings and the
vocabulary size still read), so a bfloat16 model's linear weights take twice their bytes.
"""

from __future__ import annotations

import logging
import types
from functools import lru_cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# CPU flags with which bfloat16 matmuls run natively (AVX512-BF16 dot products, AMX tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(device: str, flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """The dtype a server uses unless ``--dtype`` says otherwise, and why (for the start-up log).

    bfloat16 where the CPU has native bfloat16 matmuls and oneDNN can use them (half the weight bytes a
    step reads; measured faster than float32 there); float32 otherwise, and on other devices (CUDA users
    pick their dtype).
    """
    if torch.device(device).type != "cpu":
        return torch.float32, f"device {device}: float32 unless --dtype says otherwise"
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in BF16_FLAGS if flag in flags]
    if found and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16, f"CPU has {', '.join(found)}: native bfloat16 matmuls (--dtype to override)"
    return torch.float32, (f"CPU lacks {' and '.join(BF16_FLAGS)}: bfloat16 would be emulated, float32 is "
                           "faster (--dtype to override)")


def resolve_dtype(name: str, device: str, announce: bool = False) -> torch.dtype:
    """``--dtype``: "auto" (:func:`auto_dtype`, logged when ``announce``) or a torch dtype's name."""
    if name != "auto":
        return getattr(torch, name)
    dtype, why = auto_dtype(device)
    if announce:
        log.info("dtype %s (--dtype auto): %s", str(dtype).removeprefix("torch."), why)
    return dtype


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # x: [..., in] -> [..., out]. Packed only for bfloat16 CPU inputs without autograd (the engine's
    # forwards); anything else (a test's float32 input, a backward) takes the module's own path.
    if (x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Give every bfloat16 CPU ``nn.Linear`` of ``model`` a oneDNN-packed weight; returns how many.

    No-op (0) for other dtypes and devices, or where this torch build has no oneDNN bfloat16.
    """
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, "_packed_weight"):
            continue
        weight = module.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            continue
        with torch.no_grad():
            # an attribute, not a buffer: state_dict, .to() and PEFT see only the original weight
            object.__setattr__(module, "_packed_weight",
                               torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        # rerouting this instance's forward is the point
        module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        packed += 1
    if packed:
        log.info("bfloat16 linear layers: %d weights prepacked for oneDNN", packed)
    return packed
