"""The C linear kernels (server/engine/cpu_linears.c) against a float64 product, shape by shape.

The engine's outputs with them in place are proven against PEFT by the oracle tests (an AMX kernel that skips
its last 32 inputs fails 24 engine tests, bfloat16 PEFT and the Llama stack's among them); these pin each
kernel's arithmetic on its own: partial blocks of rows and outputs, biases, strided inputs, and that an output
is the same whichever matrix holds its row (what the Llama stack's fused q|k|v relies on).
"""

from __future__ import annotations

import pytest
import torch

from server.engine import cpu_kernels

pytestmark = pytest.mark.usefixtures("fresh_kernels")

needs_bf16 = pytest.mark.skipif("avx512_bf16" not in cpu_kernels.cpu_flags(),
                                reason="the small-row linear kernel needs AVX512-BF16; oneDNN runs them here")
needs_amx = pytest.mark.skipif("amx_bf16" not in cpu_kernels.cpu_flags(),
                               reason="the AMX linear kernel needs AMX tiles; oneDNN runs these steps here")
needs_avx512 = pytest.mark.skipif("avx512f" not in cpu_kernels.cpu_flags(),
                                  reason="the float32 linear kernel needs AVX-512; MKL runs these steps here")
# (out, in, bias): 70 outputs end in a partial 16-output block after an odd count of blocks (AMX takes them in
# pairs, float32 in threes)
SHAPES = [(960, 576, False), (70, 64, True), (1, 1536, True)]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    packed = cpu_kernels.pack(weight)
    assert packed is not None, "the CPU has the instructions, so the build and the packing must succeed"
    return packed


def _check(rows: int, out: int, in_: int, bias: bool, dtype: torch.dtype, packed: bool, rtol: float) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out, in_, generator=generator).to(dtype)
    b = torch.randn(out, generator=generator).to(dtype) if bias else None
    # a view with a row stride, as a packed step's kept rows can be
    x = torch.randn(1, rows, 2 * in_, generator=generator).to(dtype)[..., :in_]
    got = cpu_kernels.linear(x, weight, b, _packed(weight) if packed else None)
    assert got is not None and got.shape == (1, rows, out) and got.dtype == dtype
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(got.double(), exact, atol=rtol * exact.abs().max().item(), rtol=rtol)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize(("out", "in_", "bias"), SHAPES)
def test_small_row_linear_matches_a_float64_product_rounded_once(rows, out, in_, bias):
    # float32 sums of 2-product pairs, then one rounding to bfloat16 (2^-8 relative)
    _check(rows, out, in_, bias, torch.bfloat16, packed=False, rtol=8e-3)


@needs_amx
@pytest.mark.parametrize("rows", [2, 3, 16, 17, 33, 64])
@pytest.mark.parametrize(("out", "in_", "bias"), SHAPES)
def test_amx_linear_matches_a_float64_product(rows, out, in_, bias):
    # 17 and 33 rows: a partial 16-row tile, and a last 32-row block of one tile
    _check(rows, out, in_, bias, torch.bfloat16, packed=True, rtol=8e-3)


@needs_avx512
@pytest.mark.parametrize("rows", [2, 7, 8, 9, 33, 128])
@pytest.mark.parametrize(("out", "in_", "bias"), [*SHAPES, (50, 36, True)])
def test_float32_linear_matches_a_float64_product(rows, out, in_, bias):
    # 7 and 9 rows: partial 8-row blocks; 36 inputs: float32 takes any count
    _check(rows, out, in_, bias, torch.float32, packed=True, rtol=2e-5)


def _fused_equals_parts(dtype: torch.dtype, rows: int, packed: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(n, 576, generator=generator).to(dtype) for n in (576, 200))
    x = torch.randn(rows, 576, generator=generator).to(dtype)
    fused_weight = torch.cat([q, k])
    fused_packed = _packed(fused_weight) if packed else None
    fused = cpu_kernels.linear(x, fused_weight, None, fused_packed)
    # each part alone, from its own copy and from its rows of the fused copy (what FusedLinear's parts read)
    for parts in ([_packed(w) if packed else None for w in (q, k)],
                  [cpu_kernels.packed_part(fused_packed, 576, start) for start in (0, 576)]):
        separate = [cpu_kernels.linear(x, w, None, p) for w, p in zip((q, k), parts)]
        assert fused is not None and all(s is not None for s in separate)
        assert torch.equal(fused, torch.cat(separate, -1))  # type: ignore[arg-type]
        if not packed:
            break
    assert fused is not None
    return fused


@needs_bf16
def test_each_output_is_the_same_whichever_matrix_holds_its_row():
    """q|k|v fused into one weight must give what the three projections give (the Llama stack's fused q|k|v
    against transformers' modules, tests/engine/test_llama_stack.py)."""
    _fused_equals_parts(torch.bfloat16, 2, packed=False)


@needs_avx512
def test_float32_outputs_are_the_same_whichever_matrix_holds_their_row():
    _fused_equals_parts(torch.float32, 9, packed=True)


@needs_amx
def test_amx_outputs_are_the_same_whichever_matrix_holds_their_row_and_survive_onednns_tiles():
    fused = _fused_equals_parts(torch.bfloat16, 5, packed=True)
    # oneDNN configures the same tile registers its own way (AMX, 512 rows); ours must not depend on them
    onednn = torch.ops.mkldnn._reorder_linear_weight(torch.randn(776, 576).bfloat16(), None)
    torch.ops.mkldnn._linear_pointwise(torch.randn(512, 576).bfloat16(), onednn, None, "none", [], "")
    assert torch.equal(_fused_equals_parts(torch.bfloat16, 5, packed=True), fused)


def test_steps_outside_the_kernels_are_left_to_onednn_and_mkl(monkeypatch):
    weight = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert cpu_kernels.linear(torch.zeros(3, 64, dtype=torch.bfloat16), weight, None) is None  # unpacked
    narrow = torch.zeros(64, 48, dtype=torch.bfloat16)  # 48 inputs: not whole 32-input dot products
    assert cpu_kernels.linear(torch.zeros(1, 48, dtype=torch.bfloat16), narrow, None) is None
    assert cpu_kernels.pack(narrow) is None
    assert cpu_kernels.linear(torch.zeros(1, 64), weight.float(), None) is None  # float32, 1 row: MKL
    for dtype in (torch.bfloat16, torch.float32):
        packed = cpu_kernels.pack(weight.to(dtype))
        if packed is not None:
            rows = max(cpu_kernels.AMX_MAX_ROWS, cpu_kernels.F32_MAX_ROWS) + 1
            too_many = torch.zeros(rows, 64, dtype=dtype)
            assert cpu_kernels.linear(too_many, weight.to(dtype), None, packed) is None
            assert cpu_kernels.packed_part(packed, 64, 8) is None  # a part must start on a 16-output block
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the kernels are single-threaded
    assert cpu_kernels.pack(weight.float()) is None


@pytest.mark.skipif("avx512f" not in cpu_kernels.cpu_flags(), reason="the point is a build below this CPU")
def test_a_build_without_the_cpus_instructions_keeps_the_libraries(tmp_path, monkeypatch):
    """A compiler older than the CPU builds stubs for what it cannot emit: none may then be used as a kernel
    (the packed copies would be garbage, the rotary output uninitialised)."""
    wrapper = tmp_path / "old-cc"
    wrapper.write_text('#!/bin/sh\nexec gcc "$@" -march=x86-64-v2\n')  # the last -march wins: no AVX at all
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    cpu_kernels.library.cache_clear()
    cpu_kernels.amx.cache_clear()
    try:
        assert cpu_kernels.library() is not None
        features = (cpu_kernels.FEATURE_AVX512, cpu_kernels.FEATURE_BF16, cpu_kernels.FEATURE_AMX)
        assert not any(cpu_kernels.built_with(feature) for feature in features)
        weight = torch.randn(64, 64)
        assert cpu_kernels.pack(weight) is None and cpu_kernels.pack(weight.bfloat16()) is None
        assert not cpu_kernels.amx()
        x = torch.randn(1, 64).bfloat16()
        assert cpu_kernels.linear(x, weight.bfloat16(), None) is None
        pool = torch.zeros(8, 2, 32, dtype=torch.bfloat16)
        assert not cpu_kernels.supports_rope(x, pool, pool, 32)
        assert not cpu_kernels.supports_prefill(x, pool, pool, 4, 2, 32)
    finally:
        cpu_kernels.library.cache_clear()
        cpu_kernels.amx.cache_clear()  # the engine's AMX state for the tests after this one
