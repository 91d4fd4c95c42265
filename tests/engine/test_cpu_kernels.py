"""The C decode attention (server/engine/cpu_kernels.c) against SDPA on gathered keys, and how it is built.

The engine's own outputs with the kernel in place are proven against PEFT by test_engine_oracle.py (a kernel
that drops a row's last key fails 53 of those tests); these tests pin the kernel's arithmetic on its own,
shape by shape, and the build: compiled once per machine into the cache, reused, switched off on request.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from server.engine import cpu_kernels


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(autouse=True)
def _fresh_library(monkeypatch, _module_cache):
    # one build for this module's tests (about a second each), in a cache of its own
    monkeypatch.setenv("PREFIX_SERVE_CACHE", str(_module_cache))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    cpu_kernels.library.cache_clear()
    yield
    cpu_kernels.library.cache_clear()  # the next test (or the engine) loads it from its own cache again


def _reference(q, keys, values, slots, lengths, scale):
    """float64 attention of each row's query over keys[slots[r, :lengths[r]]]: [g, H, D]."""
    rows, heads, dim = q.shape
    kv_heads = keys.shape[1]
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        picked = slots[r, : lengths[r]]
        k = keys.double()[picked].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)  # [H, n, D]
        v = values.double()[picked].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        out[r] = F.scaled_dot_product_attention(q[r].double()[:, None], k, v, scale=scale)[:, 0]
    return out


def _case(heads, kv_heads, dim, dtype, rows=5, width=40, pool=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(pool, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(pool, kv_heads, dim, generator=generator).to(dtype)
    # rows of different lengths in one call, their slots scattered over the pool as a paged cache leaves them
    slots = torch.stack([torch.randperm(pool, generator=generator)[:width] for _ in range(rows)])
    lengths = torch.tensor([width - 7 * r for r in range(rows)])
    q = torch.randn(rows, heads, dim, generator=generator).to(dtype)
    return q, keys, values, slots, lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 16), (8, 1, 128), (6, 2, 256),
                                                        (14, 2, 32), (10, 2, 48)])
def test_decode_attention_matches_attention_over_the_gathered_keys(heads, kv_heads, dim, dtype):
    assert cpu_kernels.supports_shape(heads, kv_heads, dim)
    q, keys, values, slots, lengths = _case(heads, kv_heads, dim, dtype)
    out = torch.full_like(q, float("nan"))
    cpu_kernels.decode_attention(q, keys, values, slots, lengths, dim**-0.5, out)
    expected = _reference(q, keys, values, slots, lengths, dim**-0.5)
    # float32: summation order only; bfloat16: the one rounding of the output (2^-8 relative)
    tolerance = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_queries_may_be_a_strided_view_and_padding_slots_are_never_read():
    q, keys, values, slots, lengths = _case(9, 3, 64, torch.float32)
    # the engine passes q as a [g, H, D] view of its [H, T, D] projection; padding past a row's length holds
    # slots of NaN keys, which must not reach any output
    wide = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not wide.is_contiguous()
    keys, values = torch.cat([keys, torch.full_like(keys[:1], float("nan"))]), torch.cat([values, values[:1]])
    padded = slots.clone()
    for r, n in enumerate(lengths.tolist()):
        padded[r, n:] = keys.shape[0] - 1
    out = torch.empty_like(q)
    cpu_kernels.decode_attention(wide, keys, values, padded, lengths, 0.125, out)
    torch.testing.assert_close(out.double(), _reference(q, keys, values, slots, lengths, 0.125),
                               atol=2e-6, rtol=2e-6)


def test_a_non_finite_key_makes_its_rows_output_nan_as_torch_does():
    q, keys, values, slots, lengths = _case(9, 3, 64, torch.bfloat16, rows=2)
    keys[slots[0, 3], 1] = float("nan")  # row 0's fourth key, key/value head 1 (query heads 3..5)
    out = torch.empty_like(q)
    cpu_kernels.decode_attention(q, keys, values, slots, lengths, 0.125, out)
    assert out[0, 3:6].isnan().all() and not out[0, :3].isnan().any() and not out[0, 6:].isnan().any()
    assert not out[1].isnan().any() or bool((slots[1, : lengths[1]] == slots[0, 3]).any())


def test_shapes_outside_the_kernels_cases_are_refused_for_torchs_path():
    assert not cpu_kernels.supports_shape(8, 8, 8)  # a head narrower than 16 lanes
    assert not cpu_kernels.supports_shape(16, 1, 64)  # 16 query heads per key/value head
    assert not cpu_kernels.supports_shape(4, 4, 512)
    assert not cpu_kernels.supports(torch.zeros(2, dtype=torch.float16))


def test_built_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIX_SERVE_CACHE", str(tmp_path / "cache"))
    lib = cpu_kernels.library()
    assert lib is not None, "the Makefile installs gcc: the kernels must build here"
    [built] = (tmp_path / "cache" / "kernels").glob("cpu_kernels-*.so")
    stamp = built.stat().st_mtime_ns
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None
    assert built.stat().st_mtime_ns == stamp and len(list(built.parent.iterdir())) == 1  # loaded, not rebuilt


def test_switched_off_or_without_a_compiler_the_engine_keeps_torchs_path(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.library() is None and not cpu_kernels.supports(torch.zeros(2))
    cpu_kernels.library.cache_clear()
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="server.engine.cpu_kernels"):
        assert cpu_kernels.library() is None
    assert "CPU kernels unavailable" in caplog.text


needs_bf16 = pytest.mark.skipif("avx512_bf16" not in cpu_kernels.cpu_flags(),
                                reason="the small-row linear kernel needs AVX512-BF16; oneDNN runs them here")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize(("out", "in_", "bias"), [(960, 576, False), (70, 64, True), (1, 1536, True)])
def test_small_row_linear_matches_a_float64_product_rounded_once(rows, out, in_, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out, in_, generator=generator).bfloat16()
    b = torch.randn(out, generator=generator).bfloat16() if bias else None
    # a view with a row stride, as a packed step's kept rows can be
    x = torch.randn(1, rows, 2 * in_, generator=generator).bfloat16()[..., :in_]
    got = cpu_kernels.linear(x, weight, b)
    assert got is not None and got.shape == (1, rows, out) and got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    # float32 sums of 2-product pairs, then one rounding to bfloat16 (2^-8 relative)
    torch.testing.assert_close(got.double(), exact, atol=1e-2 * exact.abs().max().item(), rtol=8e-3)


@needs_bf16
def test_each_output_is_the_same_whichever_matrix_holds_its_row():
    """q|k|v fused into one weight must give what the three projections give (the Llama stack's fused q|k|v
    against transformers' modules, tests/engine/test_llama_stack.py)."""
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(n, 576, generator=generator).bfloat16() for n in (576, 192))
    x = torch.randn(2, 576, generator=generator).bfloat16()
    fused = cpu_kernels.linear(x, torch.cat([q, k]), None)
    assert fused is not None
    assert torch.equal(fused, torch.cat([cpu_kernels.linear(x, q, None), cpu_kernels.linear(x, k, None)], -1))


def test_small_row_linear_leaves_other_steps_to_onednn():
    weight = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert cpu_kernels.linear(torch.zeros(3, 64, dtype=torch.bfloat16), weight, None) is None  # 3 rows
    narrow = torch.zeros(64, 48, dtype=torch.bfloat16)  # 48 inputs: not whole 32-input dot products
    assert cpu_kernels.linear(torch.zeros(1, 48, dtype=torch.bfloat16), narrow, None) is None
    assert cpu_kernels.linear(torch.zeros(1, 64), weight.float(), None) is None  # float32: MKL


needs_amx = pytest.mark.skipif("amx_bf16" not in cpu_kernels.cpu_flags(),
                               reason="the AMX linear kernel needs AMX tiles; oneDNN runs these steps here")


def _amx_weight(weight: torch.Tensor) -> torch.Tensor:
    assert cpu_kernels.amx(), "the CPU has AMX, so the build and the tile request must succeed"
    packed = cpu_kernels.pack_amx(weight)
    assert packed is not None
    return packed


@needs_amx
@pytest.mark.parametrize("rows", [2, 3, 16, 17, 33, 64])
@pytest.mark.parametrize(("out", "in_", "bias"), [(960, 576, False), (70, 64, True), (1, 1536, True)])
def test_amx_linear_matches_a_float64_product(rows, out, in_, bias):
    # 70 outputs: a partial 16-output block, and an odd count of blocks (the kernel takes them in pairs);
    # 17 and 33 rows: a partial 16-row tile, and a last 32-row block of one tile
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out, in_, generator=generator).bfloat16()
    b = torch.randn(out, generator=generator).bfloat16() if bias else None
    x = torch.randn(1, rows, 2 * in_, generator=generator).bfloat16()[..., :in_]  # row-strided view
    got = cpu_kernels.linear(x, weight, b, _amx_weight(weight))
    assert got is not None and got.shape == (1, rows, out) and got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(got.double(), exact, atol=1e-2 * exact.abs().max().item(), rtol=8e-3)


@needs_amx
def test_amx_outputs_are_the_same_whichever_matrix_holds_their_row_and_survive_onednns_tiles():
    generator = torch.Generator().manual_seed(4)
    q, k = (torch.randn(n, 576, generator=generator).bfloat16() for n in (576, 200))
    x = torch.randn(5, 576, generator=generator).bfloat16()
    fused_weight = torch.cat([q, k])
    fused = cpu_kernels.linear(x, fused_weight, None, _amx_weight(fused_weight))
    parts = [cpu_kernels.linear(x, w, None, _amx_weight(w)) for w in (q, k)]
    assert fused is not None and all(p is not None for p in parts)
    assert torch.equal(fused, torch.cat(parts, -1))  # type: ignore[arg-type]
    # oneDNN configures the same tile registers its own way (AMX, 512 rows); ours must not depend on them
    packed = torch.ops.mkldnn._reorder_linear_weight(fused_weight, None)
    torch.ops.mkldnn._linear_pointwise(torch.randn(512, 576).bfloat16(), packed, None, "none", [], "")
    assert torch.equal(cpu_kernels.linear(x, fused_weight, None, _amx_weight(fused_weight)), fused)


@needs_amx
def test_amx_linear_leaves_large_steps_to_onednn_and_is_not_packed_for_threaded_engines(monkeypatch):
    weight = torch.randn(64, 64).bfloat16()
    packed = _amx_weight(weight)
    too_many = torch.zeros(cpu_kernels.AMX_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    assert cpu_kernels.linear(too_many, weight, None, packed) is None
    assert cpu_kernels.pack_amx(torch.randn(64, 48).bfloat16()) is None  # not whole 32-input blocks
    assert cpu_kernels.pack_amx(weight.float()) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the kernels are single-threaded
    assert cpu_kernels.pack_amx(weight) is None
