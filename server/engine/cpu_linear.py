"""bfloat16 on CPU at the speed of its instructions: oneDNN-prepacked linear weights, and the start-up dtype.

``F.linear`` on bfloat16 CPU tensors reorders the weight into oneDNN's blocked layout on every call; for a
decode step (a few rows against every weight) that reorder is most of the work, so bfloat16 was no faster
than float32 there even with AVX512-BF16/AMX. Measured on the 2-core Intel Xeon (AMX, one thread), per call,
1 row: 576->1536 274 us -> 79 us, 1536->576 307 -> 58, the 49152-wide head 21.3 ms -> 13.4 ms; 32 rows:
576->1536 297 -> 87 us. So the runner packs each ``nn.Linear`` weight once (:func:`pack_linears`) and calls
oneDNN's linear on the packed copy; the result is the same bfloat16 product with float32 accumulation.

The packed copy is held next to the original weight (which the rest of transformers, tied embeddings and the
vocabulary size still read), so a bfloat16 model's linear weights take twice their bytes; three times on a CPU
with AMX, where each also gets the AMX kernel's tile-blocked copy (cpu_kernels.pack) for decode steps of 2-64
rows, in one-thread engines. A float32 model's take twice theirs there (the float32 kernel's panels, 4-64
rows, on AVX-512 CPUs).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from server.engine import cpu_kernels
from server.engine.cpu_kernels import cpu_flags

log = logging.getLogger(__name__)

# CPU flags with which bfloat16 matmuls run natively (AVX512-BF16 dot products, AMX tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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
    # x: [..., in] -> [..., out]. Packed only for CPU inputs of the weight's dtype without autograd (the
    # engine's forwards); anything else (a test's float32 input to a bfloat16 model, a backward) takes the
    # module's own path.
    if (x.dtype != self.weight.dtype or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return F.linear(x, self.weight, self.bias)
    kernel_weight: torch.Tensor | None = self._kernel_weight  # type: ignore[assignment]  # see pack_linears
    small = cpu_kernels.linear(x, self.weight, self.bias, kernel_weight)  # a decode step's rows (or None)
    if small is not None:
        return small
    packed: torch.Tensor | None = self._packed_weight  # type: ignore[assignment]
    if packed is None:  # float32: MKL
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Give every bfloat16 CPU ``nn.Linear`` of ``model`` a oneDNN-packed weight, and every one the C
    kernels' copy where they run (cpu_kernels.pack: bfloat16 with AMX, float32 with AVX-512, one-thread
    engines); returns how many were rerouted. No-op (0) for other dtypes and devices, and for bfloat16 where
    this torch build has no oneDNN bfloat16 and the kernels do not run.
    """
    onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    rerouted = 0
    for module in model.modules():
        if (type(module) is not torch.nn.Linear or hasattr(module, "_kernel_weight")
                or hasattr(module, "_fused_into")):  # a FusedLinear's part: its packed copy is the fused one
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
            continue
        with torch.no_grad():
            # attributes, not buffers: state_dict, .to() and PEFT see only the original weight
            packed = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
                      if weight.dtype == torch.bfloat16 and onednn else None)
            kernel_weight = cpu_kernels.pack(weight)  # None: no kernel for several rows here
        if packed is None and kernel_weight is None:
            continue
        object.__setattr__(module, "_packed_weight", packed)
        object.__setattr__(module, "_kernel_weight", kernel_weight)
        # rerouting this instance's forward is the point
        module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        rerouted += 1
    if rerouted:
        log.info("linear layers: %d weights prepacked (oneDNN for bfloat16, the C kernels' copies where they "
                 "run)", rerouted)
    return rerouted


class FusedLinear:
    """Several ``nn.Linear``\\ s of one input as one matmul (a layer's q|k|v, or gate|up): out [..., sum of
    their out features], in the modules' order.

    Fewer, wider calls: one layer's q, k and v projections at one thread, bfloat16 (2-core Xeon, AMX), took
    0.41x the time of three calls for one row, 0.57x for 32 rows and 0.84-0.94x for 256-512 rows (gate|up:
    0.81x, 0.84x, but 1.10-1.18x at 512-2048 rows, so llama_stack.py fuses q|k|v only). Memory stays as it
    was: the modules' weights become views of the concatenated weight (``.data``, so every reference to the
    parameters stays valid), and for bfloat16 on CPU the one oneDNN-packed copy is the concatenated one
    (:func:`pack_linears` then leaves the modules unpacked: called directly, they take ``F.linear``). So it
    is built before pack_linears runs on the model.

    float32 results equal the separate modules' bit for bit (the same MKL dot products); bfloat16 ones do
    for a decode step's few rows, while at hundreds of rows oneDNN may block the wider matrix differently,
    which moves the last bit of some outputs.
    """

    def __init__(self, modules: list[torch.nn.Linear]):
        assert not any(hasattr(m, "_packed_weight") for m in modules), "fuse before pack_linears"
        self.sizes = [m.weight.shape[0] for m in modules]
        with torch.no_grad():
            fused = torch.cat([m.weight.detach() for m in modules])  # [sum(out), in]
            for module, part in zip(modules, fused.split(self.sizes)):
                module.weight.data = part
            self.weight = fused
            self.bias = None
            if any(m.bias is not None for m in modules):
                self.bias = torch.cat([m.bias.detach() if m.bias is not None
                                       else fused.new_zeros(m.weight.shape[0]) for m in modules])
        self.packed = None
        if (fused.dtype == torch.bfloat16 and fused.device.type == "cpu"
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(fused, None)
        self.kernel_weight = cpu_kernels.pack(fused)  # None: no C kernel for several rows here
        start = 0
        for module in modules:
            object.__setattr__(module, "_fused_into", self)  # pack_linears leaves it unpacked
            # called alone (transformers' own layers), a part reads its rows of the fused kernel copy, so its
            # outputs stay the fused matmul's bit for bit on the kernels' steps
            part = cpu_kernels.packed_part(self.kernel_weight, fused.shape[1], start)
            if part is not None:
                object.__setattr__(module, "_packed_weight", None)
                object.__setattr__(module, "_kernel_weight", part)
                module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
            start += module.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., sum(out)]; inference only (the engine's forwards)
        if x.dtype == self.weight.dtype:
            small = cpu_kernels.linear(x, self.weight, self.bias, self.kernel_weight)  # a decode step's rows
            if small is not None:
                return small
        if self.packed is not None and x.dtype == torch.bfloat16:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
