"""bfloat16 on CPU: the start-up dtype chosen by the CPU's flags, and oneDNN-prepacked linear weights that
compute what ``F.linear`` computes (test_families.py's engine-vs-PEFT bfloat16 case runs through them)."""

from __future__ import annotations

import pytest
import torch

from server.config import Settings
from server.engine import cpu_kernels
from server.engine.cpu_linear import FusedLinear, auto_dtype, cpu_flags, pack_linears, resolve_dtype
from server.engine.model import wrap_model
from tests.helpers.support import tiny_model

needs_onednn_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                       reason="this torch build has no oneDNN bfloat16")


@needs_onednn_bf16
@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"amx_bf16", "avx512f"}])
def test_auto_picks_bfloat16_where_the_cpu_has_native_bf16(flags):
    dtype, why = auto_dtype("cpu", frozenset(flags))
    assert dtype == torch.bfloat16 and "bf16" in why


@pytest.mark.parametrize(("device", "flags"), [("cpu", {"avx2", "avx512f", "fma"}), ("cuda", {"amx_bf16"})])
def test_auto_keeps_float32_without_bf16_instructions_or_off_cpu(device, flags):
    dtype, why = auto_dtype(device, frozenset(flags))
    assert dtype == torch.float32 and "--dtype" in why


def test_the_server_defaults_to_auto_and_an_explicit_dtype_overrides():
    assert Settings().dtype == "auto"
    assert Settings().torch_dtype == auto_dtype("cpu", cpu_flags())[0]
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="choose auto or one of"):
        Settings(dtype="int8")


@needs_onednn_bf16
def test_packed_linears_compute_what_f_linear_computes(tokenizer):
    model = tiny_model("llama").to(torch.bfloat16).eval()
    reference = wrap_model(tiny_model("llama").to(torch.bfloat16), tokenizer, "llama").model
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(model) == linears > 0
    assert pack_linears(model) == 0  # once
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.inference_mode():
        got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)
    # float32 is rerouted only where its C kernel runs (AVX-512, one thread), else it stays on F.linear (MKL)
    float_model, float_reference = tiny_model("llama").eval(), tiny_model("llama").eval()
    kernel = cpu_kernels.pack(torch.zeros(16, 16)) is not None
    assert pack_linears(float_model) == (linears if kernel else 0)
    with torch.inference_mode():  # 6 rows: the kernel's step, float32 sums in another order than MKL's
        torch.testing.assert_close(float_model(input_ids=ids).logits, float_reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    # the original weights are untouched and still what the state dict and tied embeddings hold
    assert all(not k.endswith("_packed_weight") for k in model.state_dict())


@needs_onednn_bf16
def test_a_packed_linear_still_trains_through_autograd():
    """Prefix training runs the frozen base with inputs that need gradients: those take F.linear."""
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    pack_linears(linear)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    linear(x).float().sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(3, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_linears_equal_the_separate_ones_and_take_no_more_memory(dtype):
    torch.manual_seed(0)
    parts = [torch.nn.Linear(64, n, bias=bias).to(dtype) for n, bias in ((64, True), (32, False), (16, True))]
    x = torch.randn(1, 5, 64, dtype=dtype)
    with torch.inference_mode():
        separate = torch.cat([part(x) for part in parts], -1)  # [1, 5, 112]
        fused = FusedLinear(parts)
        assert torch.equal(fused(x), separate)  # a decode step's few rows: bit for bit
        assert torch.equal(torch.cat([part(x) for part in parts], -1), separate)  # the parts still work alone
    # the parts' weights are views of the fused one: one copy of the weights, not two
    assert all(part.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
               for part in parts)
    # and pack_linears leaves them to the fused matmul (no second packed copy)
    assert pack_linears(torch.nn.ModuleList(parts)) == 0
