"""The engine's C kernels (cpu_kernels.c: decode attention, rotary + cache write; cpu_linears.c: linear layers
of a decode step's rows; cpu_prefill.c: AMX prefill attention): compiled once per machine with the system's C
compiler into one library, loaded with ctypes, and used where they apply; torch's ops do the same work
everywhere else.

Why C and not more torch ops: a decode step's attention through torch first copies every row's keys and
values out of the paged pools (``index_select``) and then runs SDPA over the copy; at 32 streams that was
6 ms of gathering plus 9 ms of attention in a 77 ms bfloat16 step on the 2-core Xeon at one thread
(docs/benchmarks.md). :func:`decode_attention` reads the pools at each row's slots directly, in one pass.
And :func:`linear` runs a decode step's bfloat16 linears of 1 or 2 rows without oneDNN's fixed cost per call
(about 24 us; a step makes 151 calls), and on CPUs with AMX those of 2-64 rows through the tiles, streaming
the weights at memory speed where oneDNN's 32-row step read them at about 8 GB/s. All are single-threaded
and apply to one-thread engines only.

The library is built by ``gcc -O3 -march=native`` (``$CC`` overrides the compiler) into the cache
directory (``$PREFIX_SERVE_CACHE``, else ``~/.cache/prefix-serve``; a temporary folder where that is
read-only), named by a hash of the source, the compiler and its flags and this CPU's flags, so a machine
builds it once (about 3 seconds) and a changed source or CPU gets a fresh build. No C compiler, or a failed
build: the engine logs why and keeps torch's path, which computes the same attention.
``PREFIX_SERVE_CPU_KERNELS=0`` turns the kernels off (the A/B benchmarks, a suspected kernel bug).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# compiled together into one library; the header is only hashed (a changed one must rebuild)
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("cpu_kernels.c", "cpu_linears.c", "cpu_prefill.c", "cpu_prefill_f32.c"))
HEADER = Path(__file__).with_name("cpu_kernels.h")
# -ffast-math lets gcc reorder float sums (vectorised dot products); -fno-finite-math-only keeps NaN and inf
# semantics, so a broken prefix still shows as non-finite logits.
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-shared")
ENV_SWITCH = "PREFIX_SERVE_CPU_KERNELS"

_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_I64 = ctypes.c_int64


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_dir() -> Path:
    base = os.environ.get("PREFIX_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefix-serve")
    return Path(base) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build(compiler: str) -> Path:
    """The compiled library's path, building it first unless this machine already has it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [path.read_text() for path in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*texts, compiler, version, *FLAGS,
                                    *sorted(cpu_flags())]).encode()).hexdigest()[:16]
    name = f"cpu_kernels-{key}.so"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"prefix-serve-kernels-{os.getuid()}"):
        if (folder / name).exists():
            return folder / name
        try:  # a read-only cache (a container's, built by root) falls back to a temporary folder
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            break
    else:
        raise RuntimeError(f"no writable folder for the compiled kernels (tried {_cache_dir()})")
    target = folder / name
    # built under a temporary name and renamed: engines starting together never load a half-written file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *FLAGS, "-o", partial, *map(str, SOURCES), "-lm"], check=False,
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (switched off, no compiler, or the build failed: logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("CPU kernels off (%s=0): torch's ops run instead", ENV_SWITCH)
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("CPU kernels unavailable: no C compiler (gcc or $CC) on this machine; torch's ops run "
                    "instead (slower decode; install gcc to use them)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable (%s); torch's ops run instead", exc)
        return None
    for dtype in _DTYPES.values():
        fn = getattr(lib, f"decode_attention_{dtype}")
        fn.argtypes = [ctypes.c_void_p] * 5 + [_I64] * 7 + [ctypes.c_float, ctypes.c_void_p, _I64]
        fn.restype = ctypes.c_int
    lib.linear_bf16.argtypes = [ctypes.c_void_p, _I64, _I64, ctypes.c_void_p, ctypes.c_void_p, _I64, _I64,
                                ctypes.c_void_p, _I64]
    lib.linear_bf16.restype = ctypes.c_int
    lib.amx_init.argtypes, lib.amx_init.restype = [], ctypes.c_int
    lib.kernel_features.argtypes, lib.kernel_features.restype = [], ctypes.c_int
    lib.rope_cache_bf16.argtypes = [ctypes.c_void_p] + [_I64] * 5 + [ctypes.c_void_p] * 2 + [_I64] + \
        [ctypes.c_void_p] * 4
    lib.rope_cache_bf16.restype = ctypes.c_int
    pointer = ctypes.c_void_p
    lib.prefill_attention_bf16.argtypes = [pointer, _I64, _I64, pointer, pointer, pointer, _I64, _I64, _I64,
                                           _I64, _I64, ctypes.c_float, pointer, _I64]
    lib.prefill_attention_bf16.restype = ctypes.c_int
    lib.prefill_attention_f32.argtypes = lib.prefill_attention_bf16.argtypes
    lib.prefill_attention_f32.restype = ctypes.c_int
    for name in ("pack_amx", "pack_panels_f32"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, _I64, _I64, ctypes.c_void_p]
        getattr(lib, name).restype = None
    for name in ("linear_amx", "linear_f32"):
        getattr(lib, name).argtypes = lib.linear_bf16.argtypes
        getattr(lib, name).restype = ctypes.c_int
    log.info("CPU kernels loaded (%s)", lib._name)
    return lib


# kernel_features() bits: what the library was built with (gcc -march=native on this CPU; an older compiler
# builds stubs for what it cannot emit)
FEATURE_AVX512, FEATURE_BF16, FEATURE_AMX, FEATURE_PREFILL = 1, 2, 4, 8


@lru_cache(maxsize=4)
def _features(lib: ctypes.CDLL) -> int:
    return int(lib.kernel_features())


def built_with(feature: int) -> bool:
    """Whether the loaded library has the kernels that need ``feature`` (a FEATURE_* bit)."""
    lib = library()
    return lib is not None and bool(_features(lib) & feature)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors: CPU, one dtype they know, an engine of one torch thread
    (the kernels are single-threaded: with more, torch's ops run in parallel, and the kernels were measured
    only against one thread), and the library loaded."""
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in _DTYPES and torch.get_num_threads() == 1
            and all(t.dtype == first.dtype and t.device.type == "cpu" for t in tensors)
            and library() is not None)


def supports_shape(heads: int, kv_heads: int, dim: int) -> bool:
    """Whether decode_attention takes this head layout: dim a multiple of 16 up to 256, and at most 8 query
    heads per key/value head (the kernel's unrolled cases)."""
    return dim % 16 == 0 and dim <= 256 and heads % kv_heads == 0 and heads // kv_heads <= 8


def decode_attention(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Each row's one query against its keys and values in the pools, written into ``out``.

    q: [g, H, D] (any row and head strides, D contiguous); key_pool/value_pool: [N, Hkv, D] contiguous;
    slots: [g, W] long, row r's keys at ``slots[r, :lengths[r]]``; lengths: [g] long; out: [g, H, D], D and
    H contiguous. Call only when :func:`supports` says so."""
    lib = library()
    assert lib is not None, "supports() was checked"
    rows, heads, dim = q.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    assert out.stride(2) == 1 and out.stride(1) == dim
    assert key_pool.is_contiguous() and value_pool.is_contiguous()
    slots, lengths = slots.contiguous(), lengths.contiguous()
    fn = getattr(lib, f"decode_attention_{_DTYPES[q.dtype]}")
    status = fn(q.data_ptr(), key_pool.data_ptr(), value_pool.data_ptr(), slots.data_ptr(),
                lengths.data_ptr(), rows, slots.shape[1], heads, key_pool.shape[1], dim, q.stride(0),
                q.stride(1), scale, out.data_ptr(), out.stride(0))
    if status != 0:
        raise RuntimeError(f"decode attention refused heads={heads}, kv_heads={key_pool.shape[1]}, dim={dim} "
                           f"(status {status}; supports_shape() was not checked?)")


def supports_rope(qkv: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, dim: int) -> bool:
    """Whether :func:`rope_cache` takes a step: bfloat16 on a CPU with AVX512-BF16, an even head size,
    contiguous pools, and what :func:`supports` asks."""
    return (qkv.dtype == torch.bfloat16 and dim % 2 == 0 and built_with(FEATURE_BF16)
            and key_pool.is_contiguous() and value_pool.is_contiguous()
            and supports(qkv, key_pool, value_pool))


def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
               key_pool: torch.Tensor, value_pool: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """A step's rotary embedding and cache write in one pass, the same bfloat16 values as
    ``x * cos + rotate_half(x) * sin`` and ``index_copy_``: qkv [T, (H + 2 Hkv) * D] (q|k|v, D contiguous);
    cos, sin: [T, D]; slots: [T] long; key_pool/value_pool: [N, Hkv, D] contiguous. Writes the rotated keys
    and the values at ``slots``, returns the rotated queries [T, H, D]. Call when :func:`supports_rope`."""
    lib = library()
    assert lib is not None, "supports_rope() was checked"
    rows = qkv.shape[0]
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()  # views of the rotary embedding's [1, T, D]: no copies
    slots = slots.contiguous()
    q = torch.empty(rows, heads, dim, dtype=qkv.dtype)
    lib.rope_cache_bf16(qkv.data_ptr(), rows, qkv.stride(0), heads, key_pool.shape[1], dim, cos.data_ptr(),
                        sin.data_ptr(), cos.stride(0), slots.data_ptr(), key_pool.data_ptr(),
                        value_pool.data_ptr(), q.data_ptr())
    return q


def supports_prefill(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, heads: int,
                     kv_heads: int, dim: int) -> bool:
    """Whether :func:`prefill_attention` takes these: dim a multiple of 16 up to 256, contiguous pools, what
    :func:`supports` asks, and bfloat16 on a CPU with AMX (see :func:`amx`) or float32 on AVX-512."""
    if not (dim % 16 == 0 and dim <= 256 and heads % kv_heads == 0 and key_pool.is_contiguous()
            and value_pool.is_contiguous() and supports(q, key_pool, value_pool)
            and built_with(FEATURE_PREFILL)):
        return False
    return amx() if q.dtype == torch.bfloat16 else q.dtype == torch.float32


def prefill_attention(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, slots: torch.Tensor,
                      scale: float, out: torch.Tensor) -> None:
    """One row's prefill chunk attending causally to the row's keys in the pools, written into ``out``.

    q: [H, c, D] (any head and token strides, D contiguous), the queries of positions ``W - c .. W - 1``;
    key_pool/value_pool: [N, Hkv, D] contiguous; slots: [W] long, the row's slots by position; out: [c, H, D]
    with H and D contiguous. Call only when :func:`supports_prefill` says so."""
    lib = library()
    assert lib is not None, "supports_prefill() was checked"
    heads, chunk, dim = q.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    assert out.stride(2) == 1 and out.stride(1) == dim
    slots = slots.contiguous()
    kernel = getattr(lib, f"prefill_attention_{_DTYPES[q.dtype]}")
    status = kernel(q.data_ptr(), q.stride(1), q.stride(0), key_pool.data_ptr(), value_pool.data_ptr(),
                    slots.data_ptr(), slots.shape[0], chunk, heads, key_pool.shape[1], dim, scale,
                    out.data_ptr(), out.stride(0))
    if status != 0:
        raise RuntimeError(f"prefill attention refused heads={heads}, kv_heads={key_pool.shape[1]}, "
                           f"dim={dim}, chunk={chunk}, width={slots.shape[0]} (status {status})")


# bfloat16 without AMX: the AVX512-BF16 kernel takes steps of up to this many rows. One layer's shapes, hot in
# cache, 1 thread (2-core Xeon): 1 row 0.57-0.78x oneDNN's time, 2 rows 0.91-1.07x, 4 rows 1.5-1.9x (oneDNN's
# AMX blocking computes faster); the 49152-wide head 0.49x, 0.64x, 1.66x. The kernel itself takes up to 4.
LINEAR_MAX_ROWS = 2
# With AMX, linear_amx takes 2 to AMX_MAX_ROWS rows (the AVX512-BF16 kernel keeps 1 row: 20.3 ms against
# 22.0 for a step's 151 weights, streamed from memory; 2 rows 22.0 against 23.3). Against oneDNN's packed
# linear over the same weights (2-core Xeon, 1 thread): 0.74x the time at 2-16 rows, 0.72x at 32, 0.82x at
# 64, but 1.17x at 512, where oneDNN's blocking reuses each tile better (see docs/benchmarks.md).
AMX_MAX_ROWS = 64
# float32: linear_f32 takes F32_MIN_ROWS to F32_MAX_ROWS rows. A step's weights (2-core Xeon, 1 thread)
# against F.linear (MKL): 1 row 1.02x the time (both stream the weights at memory speed), 2 rows 0.87x,
# 3 rows 0.81x, 8 rows 0.41x, 32 rows 0.52x, 64 rows 0.75x, 128 rows 0.90x.
F32_MIN_ROWS, F32_MAX_ROWS = 2, 128
# Both packed layouts hold blocks of 16 outputs, each block's weights contiguous (in * 16 elements).
PACK_BLOCK = 16


@lru_cache(maxsize=1)
def amx() -> bool:
    """Whether :func:`linear` can use AMX tiles: the CPU has them (amx_tile, amx_bf16), the library was built
    with them, and Linux granted this process the tile state (logged once either way)."""
    lib = library()
    if lib is None or not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return False
    if not built_with(FEATURE_AMX) or lib.amx_init() != 0:
        log.warning("AMX tiles unavailable (the compiler did not build them, or Linux refused the tile "
                    "state): bfloat16 linears of 2-%d rows and prefill attention keep oneDNN and torch",
                    AMX_MAX_ROWS)
        return False
    log.info("AMX kernels on: bfloat16 linears of 2-%d rows, prefill attention", AMX_MAX_ROWS)
    return True


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The copy of ``weight`` [out, in] that :func:`linear` reads for steps of several rows, or None where no
    such kernel runs: bfloat16 in AMX tile blocks (a CPU with AMX), float32 in input-major blocks (AVX-512);
    ``in`` a multiple of 32 (bfloat16), a CPU tensor, an engine of one torch thread (the kernels are
    single-threaded; the copy would only take memory). Either holds :data:`PACK_BLOCK` outputs a block (the
    last zero-padded; float32 adds two zero blocks its kernel may read): the weight's bytes again."""
    out_features, in_features = weight.shape
    if weight.device.type != "cpu" or torch.get_num_threads() != 1:
        return None
    blocks = (out_features + PACK_BLOCK - 1) // PACK_BLOCK
    if weight.dtype == torch.bfloat16 and in_features % 32 == 0 and amx():
        packer = "pack_amx"
    elif weight.dtype == torch.float32 and built_with(FEATURE_AVX512):
        packer, blocks = "pack_panels_f32", blocks + 2
    else:
        return None
    lib = library()
    assert lib is not None
    weight = weight.detach().contiguous()
    packed = torch.empty(blocks * PACK_BLOCK * in_features, dtype=weight.dtype)
    getattr(lib, packer)(weight.data_ptr(), out_features, in_features, packed.data_ptr())
    return packed


def packed_part(packed: torch.Tensor | None, in_features: int, start: int) -> torch.Tensor | None:
    """The :func:`pack` copy of rows ``start..`` of a fused weight (q of q|k|v), as a view of the fused copy
    from that row's block on, or None where ``start`` does not begin a block (or there is no copy). The
    kernels read a part's own blocks, and each output's sum is the same in either matrix."""
    if packed is None or start % PACK_BLOCK:
        return None
    return packed[start * in_features:]


def _kernel(dtype: torch.dtype, rows: int, in_features: int, packed: bool) -> str | None:
    """Which linear kernel takes a step of ``rows`` rows (None: oneDNN or MKL)."""
    if dtype == torch.float32:
        return "linear_f32" if packed and F32_MIN_ROWS <= rows <= F32_MAX_ROWS else None
    if dtype != torch.bfloat16 or in_features % 32 or not built_with(FEATURE_BF16):
        return None
    if packed and 2 <= rows <= AMX_MAX_ROWS:
        return "linear_amx"
    return "linear_bf16" if 1 <= rows <= LINEAR_MAX_ROWS else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for a CPU ``x`` [..., in] of a decode step's few rows, or None where no kernel
    applies (then oneDNN or MKL runs it). weight: [out, in], ``x``'s dtype; ``packed`` its :func:`pack` copy
    (None: the bfloat16 1-2 row kernel only). bfloat16: 2 to :data:`AMX_MAX_ROWS` rows through AMX, else up to
    :data:`LINEAR_MAX_ROWS` through AVX512-BF16; float32: :data:`F32_MIN_ROWS` to :data:`F32_MAX_ROWS`."""
    in_features = weight.shape[1]
    rows = x.numel() // in_features if in_features else 0
    kernel = _kernel(x.dtype, rows, in_features, packed is not None)
    if (kernel is None or weight.dtype != x.dtype or not weight.is_contiguous() or x.device.type != "cpu"
            or torch.get_num_threads() != 1  # see supports()
            or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()))):
        return None
    lib = library()
    if lib is None:
        return None
    flat = x.reshape(rows, in_features)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    y = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    source = weight if kernel == "linear_bf16" else packed
    assert source is not None
    status = getattr(lib, kernel)(flat.data_ptr(), rows, flat.stride(0), source.data_ptr(),
                                  None if bias is None else bias.data_ptr(), in_features, weight.shape[0],
                                  y.data_ptr(), y.stride(0))
    if status != 0:
        return None  # built without the instructions (another compiler), or out of memory: oneDNN/MKL runs it
    return y.view(*x.shape[:-1], weight.shape[0])
