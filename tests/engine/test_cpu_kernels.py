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

pytestmark = pytest.mark.usefixtures("fresh_kernels")


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


# the prefill attention kernels: bfloat16 on AMX tiles, float32 on AVX-512 (with DQ, for the exponential)
PREFILL_DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        "amx_bf16" not in cpu_kernels.cpu_flags(), reason="needs AMX tiles; torch's flash runs here")),
    pytest.param(torch.float32, marks=pytest.mark.skipif(
        not {"avx512f", "avx512dq"} <= cpu_kernels.cpu_flags(), reason="needs AVX-512; torch's runs here")),
]


@pytest.mark.parametrize("dtype", PREFILL_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "width", "chunk"), [
    (9, 3, 64, 40, 40),  # a whole prompt in one chunk, not a multiple of 16 queries or 32 keys
    (9, 3, 64, 600, 37),  # a chunk after a cached preamble
    (8, 2, 128, 517, 512),  # a full chunk after a few keys; four 16-dim blocks and more a pass
    (2, 1, 256, 100, 17),
    (4, 4, 32, 1, 1),
    (4, 2, 16, 30, 30),  # head sizes of 16 and 48 fill part of a 32-dim block (zero-padded): the tiny models'
    (6, 2, 48, 70, 33),
])
def test_prefill_attention_matches_causal_attention_over_the_row(heads, kv_heads, dim, width, chunk, dtype):
    _check_prefill_attention(heads, kv_heads, dim, width, chunk, torch.ones(width), dtype)


@pytest.mark.parametrize("dtype", PREFILL_DTYPES)
@pytest.mark.parametrize("ramp", ["rising", "falling"])
def test_prefill_attention_keeps_the_softmax_exact_when_later_keys_score_far_higher_or_lower(ramp, dtype):
    # the kernels take keys 64 at a time with a running max per query, raised only when a block's scores
    # exceed it by more than 2^8 in e^(score - max): keys scaled 0.2x..8x along the row raise it again and
    # again (rising), or never after the first block, leaving later probabilities tiny (falling)
    scale = torch.linspace(0.2, 8.0, 650)
    _check_prefill_attention(9, 3, 64, 650, 300, scale if ramp == "rising" else scale.flip(0), dtype)


def _check_prefill_attention(heads, kv_heads, dim, width, chunk, key_scale, dtype):
    """The kernel against float64 softmax attention; key_scale [width] scales the row's keys by position."""
    generator = torch.Generator().manual_seed(width)
    pool = width + 50
    keys = torch.randn(pool, kv_heads, dim, generator=generator)
    values = torch.randn(pool, kv_heads, dim, generator=generator).to(dtype)
    slots = torch.randperm(pool, generator=generator)[:width]  # the row's slots by position, anywhere
    keys[slots] *= key_scale[:, None, None]
    keys = keys.to(dtype)
    q = torch.randn(heads, chunk + 7, dim, generator=generator).to(dtype)[:, 3:3 + chunk]  # a strided view
    assert cpu_kernels.supports_prefill(q, keys, values, heads, kv_heads, dim)
    out = torch.full((chunk, heads, dim), float("nan"), dtype=dtype)
    cpu_kernels.prefill_attention(q, keys, values, slots, dim**-0.5, out)
    k = keys.double()[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)  # [H, W, D]
    v = values.double()[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    visible = torch.arange(width)[None, :] <= torch.arange(width - chunk, width)[:, None]  # [c, W]
    scores = (q.double() @ k.transpose(1, 2) * dim**-0.5).masked_fill(~visible, float("-inf"))
    exact = (scores.softmax(-1) @ v).transpose(0, 1)  # [c, H, D]
    if dtype == torch.float32:  # float32 throughout, the exponential within 2.4e-7
        torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)
        return
    # probabilities rounded to bfloat16 before the values (as SDPA's flash attention does), output rounded
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif("avx512_bf16" not in cpu_kernels.cpu_flags(), reason="needs AVX512-BF16")
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (6, 2, 48)])
def test_rotary_and_cache_write_equal_torchs_bfloat16_ops_bit_for_bit(heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(dim)
    tokens, pool, width = 7, 40, (heads + 2 * kv_heads) * dim
    qkv = (torch.randn(tokens, width + 5, generator=generator) * 3).bfloat16()[:, :width]  # a strided view
    angles = (torch.rand(tokens, dim // 2, generator=generator) * 50).repeat(1, 2)  # [T, D], as RoPE's
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    slots = torch.randperm(pool, generator=generator)[:tokens]
    keys, values = (torch.zeros(pool, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    assert cpu_kernels.supports_rope(qkv, keys, values, dim)
    q = cpu_kernels.rope_cache(qkv, cos, sin, slots, keys, values, heads, dim)

    def rotate(x):  # llama_stack._rotate: transformers' apply_rotary_pos_emb, in bfloat16 tensors
        half = dim // 2
        return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]

    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    assert torch.equal(q.view(torch.int16), rotate(q_ref.reshape(tokens, heads, dim)).view(torch.int16))
    assert torch.equal(keys[slots].view(torch.int16),
                       rotate(k_ref.reshape(tokens, kv_heads, dim)).view(torch.int16))
    assert torch.equal(values[slots], v_ref.reshape(tokens, kv_heads, dim))
    untouched = torch.ones(pool, dtype=torch.bool)
    untouched[slots] = False
    assert not keys[untouched].any() and not values[untouched].any()
