/* The engine's linear layers for a decode step's rows (y = x W^T + bias), compiled with cpu_kernels.c into one
 * library by server/engine/cpu_kernels.py. Each output is one sum over the inputs in input order, whichever
 * matrix holds its row and whichever rows share the step: so q|k|v fused into one weight gives the separate
 * projections' values bit for bit, as the Llama stack's tests require.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#ifdef __AVX512BF16__
#include <immintrin.h>

/* y = x W^T (+ bias) for a decode step's few rows, bfloat16 in and out: the step only streams W once, and
 * oneDNN's fixed cost per call (about 24 us on the 2-core Xeon, 151 calls a step) was a tenth of a 1-stream
 * step. W [out, in] row-major (nn.Linear's own weight); x [rows, in] and y [rows, out] with row strides x_row
 * and y_row; bias [out] or NULL. AVX512-BF16 dot products (vdpbf16ps: pairs of bf16 products summed in float32)
 * over 32 inputs at a time, then one float32 sum of the 16 lanes and one rounding: each output's arithmetic
 * is the same whichever matrix it sits in, so q|k|v fused gives the separate projections' values bit for bit.
 * Four outputs share each pass over x. in % 32 == 0 and 1 <= rows <= 4, else -1. */
static inline float reduce16(__m512 x) { return _mm512_reduce_add_ps(x); }
#define PREFETCH_ROWS 16

int linear_bf16(const uint16_t *x, int64_t rows, int64_t x_row, const uint16_t *w, const uint16_t *bias,
                int64_t in, int64_t out, uint16_t *y, int64_t y_row) {
    if (in % 32 || rows < 1 || rows > 4) return -1;
    int64_t o = 0;
    for (; o + 4 <= out; o += 4) {
        const uint16_t *w0 = w + o * in;
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int k = 0; k < 4; k++) acc[r][k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 32) {
            __m512bh wv[4];
            for (int k = 0; k < 4; k++) {
                /* the rows a few blocks ahead, so DRAM streams while this block computes */
                _mm_prefetch((const char *)(w0 + (k + PREFETCH_ROWS) * in + i), _MM_HINT_T0);
                wv[k] = (__m512bh)_mm512_loadu_si512(w0 + k * in + i);
            }
            for (int r = 0; r < rows; r++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * x_row + i);
                for (int k = 0; k < 4; k++) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], xv, wv[k]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < 4; k++) {
                float b = bias ? bf16_to_f32(bias[o + k]) : 0.0f;
                y[r * y_row + o + k] = f32_to_bf16(reduce16(acc[r][k]) + b);
            }
    }
    for (; o < out; o++) {
        for (int r = 0; r < rows; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < in; i += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + r * x_row + i),
                                       (__m512bh)_mm512_loadu_si512(w + o * in + i));
            float b = bias ? bf16_to_f32(bias[o]) : 0.0f;
            y[r * y_row + o] = f32_to_bf16(reduce16(acc) + b);
        }
    }
    return 0;
}
#else
/* Without AVX512-BF16 oneDNN keeps every linear layer. */
int linear_bf16(const uint16_t *x, int64_t rows, int64_t x_row, const uint16_t *w, const uint16_t *bias,
                int64_t in, int64_t out, uint16_t *y, int64_t y_row) {
    (void)x, (void)rows, (void)x_row, (void)w, (void)bias, (void)in, (void)out, (void)y, (void)y_row;
    return -1;
}
#endif

#ifdef HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>

/* AMX (Sapphire Rapids and later): y = x W^T (+ bias) for a decode step's 3-64 rows, where oneDNN took 34
 * ms a 32-row bfloat16 step to stream 269 MB of weights (about 8 GB/s) and this takes about 25 (near the
 * 1-row kernel's bandwidth). One tile op multiplies a 16 x 32 block of x by a 32 x 16 block of W^T into a
 * 16 x 16 float32 block; W is repacked once (pack_amx) into those blocks, so each is one 1 KB load.
 *
 * Linux hands out the 8 KB of tile registers per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XTILEDATA; oneDNN asks too): 0 once granted, -1 if the kernel refuses. */
int amx_init(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) ? -1 : 0; }

/* The layout one tile op reads W^T in: out[b][c] is a 16 x 32 block, outputs 16b..16b+15 by inputs
 * 32c..32c+31, as 16 rows of input pairs, each row holding every output's pair (the "VNNI" order
 * TDPBF16PS expects); outputs past `out_features` are zero. out: ceil(out_features / 16) * 16 * in. */
void pack_amx(const uint16_t *w, int64_t out_features, int64_t in, uint16_t *out) {
    int64_t blocks = (out_features + 15) / 16, depth = in / 32;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t c = 0; c < depth; c++) {
            uint16_t *block = out + (b * depth + c) * 512;
            for (int pair = 0; pair < 16; pair++)
                for (int o = 0; o < 16; o++) {
                    int64_t row = b * 16 + o;
                    for (int j = 0; j < 2; j++)
                        block[pair * 32 + o * 2 + j] = row < out_features ? w[row * in + c * 32 + 2 * pair + j]
                                                                          : 0;
                }
        }
}

/* A 16 x 16 float32 tile plus bias, rounded (nearest even) into rows m0.. of y, outputs n0..; the rows
 * past `rows` (x's zero padding) and outputs past `out_features` are not written. */
static inline void store_tile(const float *acc, const uint16_t *bias, int64_t n0, int64_t out_features,
                              int64_t m0, int64_t rows, uint16_t *y, int64_t y_row) {
    int64_t left = out_features - n0;
    __mmask16 keep = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    __m512 b = bias ? widen16(keep, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < 16 && m0 + r < rows; r++)
        _mm256_mask_storeu_epi16(y + (m0 + r) * y_row + n0, keep,
                                 round16(_mm512_add_ps(_mm512_load_ps(acc + r * 16), b)));
}

#define AMX_PREFETCH 4 /* blocks ahead: measured flat from 1 to 16 */

/* Tiles: 0-3 accumulate a 32-row x 32-output block (two row halves x two output halves), 4-5 hold x's
 * two row halves, 6-7 W's two output halves. For each pair of output blocks W streams once, and every
 * 32 rows of x reuse it from L1. x is copied into a zero-padded buffer of whole 16-row tiles. in % 32 ==
 * 0, else -1; -2 if the buffer cannot be allocated. */
int linear_amx(const uint16_t *x, int64_t rows, int64_t x_row, const uint16_t *packed, const uint16_t *bias,
               int64_t in, int64_t out_features, uint16_t *y, int64_t y_row) {
    if (in % 32 || rows < 1) return -1;
    int64_t padded = (rows + 15) / 16 * 16, depth = in / 32, blocks = (out_features + 15) / 16;
    uint16_t *xp = aligned_alloc(64, (size_t)(padded * in * 2));
    if (!xp) return -2;
    for (int64_t r = 0; r < padded; r++) {
        if (r < rows) memcpy(xp + r * in, x + r * x_row, (size_t)in * 2);
        else memset(xp + r * in, 0, (size_t)in * 2);
    }
    amx_configure();
    float acc[4][256] __attribute__((aligned(64)));
    for (int64_t b = 0; b < blocks; b += 2) {
        int second = b + 1 < blocks;
        const uint16_t *w0 = packed + b * depth * 512, *w1 = second ? w0 + depth * 512 : w0;
        for (int64_t r = 0; r < padded; r += 32) {
            int lower = r + 16 < padded;
            const uint16_t *x0 = xp + r * in, *x1 = lower ? x0 + 16 * in : x0;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = 0; c < depth; c++) {
                if (r == 0) /* the first row block pulls W from memory: fetch a few blocks ahead */
                    for (int line = 0; line < 16; line++) {
                        _mm_prefetch((const char *)(w0 + (c + AMX_PREFETCH) * 512 + line * 32), _MM_HINT_T0);
                        _mm_prefetch((const char *)(w1 + (c + AMX_PREFETCH) * 512 + line * 32), _MM_HINT_T0);
                    }
                _tile_loadd(6, w0 + c * 512, 64);
                _tile_loadd(7, w1 + c * 512, 64);
                _tile_loadd(4, x0 + c * 32, in * 2);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                if (lower) {
                    _tile_loadd(5, x1 + c * 32, in * 2);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, acc[0], 64);
            _tile_stored(1, acc[1], 64);
            store_tile(acc[0], bias, b * 16, out_features, r, rows, y, y_row);
            if (second) store_tile(acc[1], bias, (b + 1) * 16, out_features, r, rows, y, y_row);
            if (lower) {
                _tile_stored(2, acc[2], 64);
                _tile_stored(3, acc[3], 64);
                store_tile(acc[2], bias, b * 16, out_features, r + 16, rows, y, y_row);
                if (second) store_tile(acc[3], bias, (b + 1) * 16, out_features, r + 16, rows, y, y_row);
            }
        }
    }
    _tile_release(); /* leave no tile state live: the next user (oneDNN) configures its own */
    free(xp);
    return 0;
}
#else
/* Without AMX (or a compiler that lacks it) the other linear paths run. */
int amx_init(void) { return -1; }
void pack_amx(const uint16_t *w, int64_t out_features, int64_t in, uint16_t *out) {
    (void)w, (void)out_features, (void)in, (void)out;
}
int linear_amx(const uint16_t *x, int64_t rows, int64_t x_row, const uint16_t *packed, const uint16_t *bias,
               int64_t in, int64_t out_features, uint16_t *y, int64_t y_row) {
    (void)x, (void)rows, (void)x_row, (void)packed, (void)bias, (void)in, (void)out_features, (void)y;
    (void)y_row;
    return -1;
}
#endif

#ifdef __AVX512F__
#include <immintrin.h>

/* float32, 4-64 rows: MKL's sgemm took 115 ms for a 32-row step of the 135M model's weights on the 2-core
 * Xeon (about 75 GFLOP/s) where this takes about 70. W is repacked once into blocks of 16 outputs,
 * input-major ([blocks][in][16]; outputs past `out_features` zero, and two zero blocks more, which the last
 * panel may read): each input's 16 weights of a block are one vector load. Three blocks make a panel of 48
 * outputs, each row's share of it three registers of float32 FMAs. A part of a fused weight (q of q|k|v)
 * reads the fused copy from its first block on (cpu_kernels.py packed_part): only its start must fall on a
 * block. */
#define BLOCK 16
#define PANEL_BLOCKS 3
#define PANEL_ROWS 8

void pack_panels_f32(const float *w, int64_t out_features, int64_t in, float *out) {
    int64_t blocks = (out_features + BLOCK - 1) / BLOCK + PANEL_BLOCKS - 1;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t i = 0; i < in; i++)
            for (int o = 0; o < BLOCK; o++) {
                int64_t row = b * BLOCK + o;
                out[(b * in + i) * BLOCK + o] = row < out_features ? w[row * in + i] : 0.0f;
            }
}

/* one row of x (x's zero padding included) against the panel's three blocks at input i */
#define FMA_ROW(r)                                                                                          \
    do {                                                                                                    \
        __m512 xv = _mm512_set1_ps(xr[(r) * in + i]);                                                       \
        a##r##0 = _mm512_fmadd_ps(xv, w0, a##r##0);                                                          \
        a##r##1 = _mm512_fmadd_ps(xv, w1, a##r##1);                                                          \
        a##r##2 = _mm512_fmadd_ps(xv, w2, a##r##2);                                                          \
    } while (0)
#define ZERO_ROW(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0

/* Each panel streams from memory once: the first 8-row block reads it, the others find it in L2, and while
 * they compute, the next panel is prefetched into L2 at the pace that spreads it over all of this panel's
 * row blocks (so memory and the FMAs overlap). x is copied into a zero-padded buffer of whole 8-row blocks.
 * -2 if that buffer cannot be allocated. */
int linear_f32(const float *x, int64_t rows, int64_t x_row, const float *packed, const float *bias, int64_t in,
               int64_t out_features, float *y, int64_t y_row) {
    if (rows < 1) return -1;
    int64_t padded = (rows + PANEL_ROWS - 1) / PANEL_ROWS * PANEL_ROWS, groups = padded / PANEL_ROWS;
    int64_t width = BLOCK * PANEL_BLOCKS, panels = (out_features + width - 1) / width, stride = in * BLOCK;
    float *xp = aligned_alloc(64, (size_t)((padded * in * 4 + 63) / 64 * 64));
    if (!xp) return -2;
    for (int64_t r = 0; r < padded; r++) {
        if (r < rows) memcpy(xp + r * in, x + r * x_row, (size_t)in * 4);
        else memset(xp + r * in, 0, (size_t)in * 4);
    }
    for (int64_t p = 0; p < panels; p++) {
        const float *b0 = packed + p * PANEL_BLOCKS * stride, *b1 = b0 + stride, *b2 = b1 + stride;
        const float *next = p + 1 < panels ? b0 + PANEL_BLOCKS * stride : NULL;
        int64_t tick = 0;
        for (int64_t m0 = 0; m0 < padded; m0 += PANEL_ROWS) {
            const float *xr = xp + m0 * in;
            ZERO_ROW(0); ZERO_ROW(1); ZERO_ROW(2); ZERO_ROW(3);
            ZERO_ROW(4); ZERO_ROW(5); ZERO_ROW(6); ZERO_ROW(7);
            for (int64_t i = 0; i < in; i++, tick++) {
                if (next && tick % groups == 0) {
                    const float *ahead = next + tick / groups * BLOCK;
                    _mm_prefetch((const char *)ahead, _MM_HINT_T1);
                    _mm_prefetch((const char *)(ahead + stride), _MM_HINT_T1);
                    _mm_prefetch((const char *)(ahead + 2 * stride), _MM_HINT_T1);
                }
                __m512 w0 = _mm512_loadu_ps(b0 + i * BLOCK), w1 = _mm512_loadu_ps(b1 + i * BLOCK),
                       w2 = _mm512_loadu_ps(b2 + i * BLOCK);
                FMA_ROW(0); FMA_ROW(1); FMA_ROW(2); FMA_ROW(3);
                FMA_ROW(4); FMA_ROW(5); FMA_ROW(6); FMA_ROW(7);
            }
            __m512 acc[PANEL_ROWS][PANEL_BLOCKS] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22},
                                                    {a30, a31, a32}, {a40, a41, a42}, {a50, a51, a52},
                                                    {a60, a61, a62}, {a70, a71, a72}};
            for (int j = 0; j < PANEL_BLOCKS; j++) {
                int64_t n0 = p * width + BLOCK * j, left = out_features - n0;
                if (left <= 0) break;
                __mmask16 keep = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
                __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
                for (int r = 0; r < PANEL_ROWS && m0 + r < rows; r++)
                    _mm512_mask_storeu_ps(y + (m0 + r) * y_row + n0, keep, _mm512_add_ps(acc[r][j], b));
            }
        }
    }
    free(xp);
    return 0;
}
#else
/* Without AVX-512 MKL keeps every float32 linear layer. */
void pack_panels_f32(const float *w, int64_t out_features, int64_t in, float *out) {
    (void)w, (void)out_features, (void)in, (void)out;
}
int linear_f32(const float *x, int64_t rows, int64_t x_row, const float *packed, const float *bias, int64_t in,
               int64_t out_features, float *y, int64_t y_row) {
    (void)x, (void)rows, (void)x_row, (void)packed, (void)bias, (void)in, (void)out_features, (void)y;
    (void)y_row;
    return -1;
}
#endif
