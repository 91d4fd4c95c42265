/* What the kernel sources share (cpu_kernels.c, cpu_linears.c, cpu_prefill.c): bfloat16 widened from its 16
 * bits and rounded to nearest even, as torch does (scalar and 16 lanes); softmax's exponential and max; the
 * AMX tile configuration. */
#ifndef PREFIX_SERVE_CPU_KERNELS_H
#define PREFIX_SERVE_CPU_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                           /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* Cephes' exp2f polynomial for 2^f, f in [-0.5, 0.5] (relative error about 2e-7), highest power first:
 * the scalar exponential below evaluates it (the prefill kernel's 16-lane one, cpu_prefill.c, fits [0, 1)). */
#define EXP2_C6 1.535336188319500e-4f
#define EXP2_C5 1.339887440266574e-3f
#define EXP2_C4 9.618437357674640e-3f
#define EXP2_C3 5.550332471162809e-2f
#define EXP2_C2 2.402264791363012e-1f
#define EXP2_C1 6.931472028550421e-1f
#define EXP2_C0 1.0f

/* e^x for x <= 0 (softmax's shifted scores): 2^(x log2 e) as 2^n * 2^f, f in [-0.5, 0.5]. Branch-free, so
 * the loops calling it vectorise. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float n = floorf(t + 0.5f);
    float f = t - n;
    float p = EXP2_C6;
    p = p * f + EXP2_C5;
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + EXP2_C0;
    int32_t e = (int32_t)n + 127;
    uint32_t bits = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* The largest of x[0..n-1] (-inf for none). A plain loop does not vectorise: with NaN semantics kept
 * (-fno-finite-math-only) gcc will not reorder a max, and a scalar chain took half a prefill's attention.
 * A NaN score needs no care here: its exponential is NaN, so the softmax's sum and every output are too. */
static inline float max_f32(const float *x, int64_t n) {
#ifdef __AVX512F__
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + j + 16));
    }
    for (; j < n; j += 16) {
        __mmask16 keep = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        m0 = _mm512_mask_max_ps(m0, keep, m0, _mm512_maskz_loadu_ps(keep, x + j));
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
#else
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
#endif
}

#ifdef __AVX512BF16__
/* 16 bfloat16 (masked) widened to float32, and 16 float32 rounded to bfloat16 (nearest even, as torch
 * rounds): the loads and stores of every kernel that computes bfloat16 in float32 lanes. */
static inline __m512 widen16(__mmask16 keep, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p)), 16));
}
static inline __m256i round16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* What the two prefill attention kernels share (cpu_prefill.c for bfloat16 on AMX, cpu_prefill_f32.c). */
#define HAVE_PREFILL_MATH 1

/* 2^t, 16 lanes: f = t - floor(t) in [0, 1) by vreduceps, 2^f by a degree-5 polynomial (a least-squares
 * fit in relative error, at most 2.4e-7 from 2^f, with 2^0 = 1 exactly), times 2^floor(t) by vscalefps, which
 * gives 0 below float's range, so t needs no clamp. Three instructions fewer than round, subtract and
 * exp_nonpositive's degree-6 polynomial on [-0.5, 0.5]; the exponentials are most of the kernel's time. */
static inline __m512 exp2_16(__m512 t) {
    __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(1.8571876310247047e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.02880753082792e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5802054686316875e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40159023663246e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931524558099379e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, t);
}

/* Which of the 16 queries see key `key` (positions; the block's first query is at `first`, `rows` of them). */
static inline __mmask16 prefill_sees(int64_t key, int64_t first, int64_t rows) {
    const int64_t shift = key - first;
    const uint32_t valid = (1u << rows) - 1;
    return (__mmask16)(shift <= 0 ? valid : shift >= 16 ? 0 : valid & (0xffffu << shift));
}

/* The online softmax's max step for 16 queries over `used` keys (a multiple of 4) of s, key j's 16 scores at
 * s + 16 j, leaving out the keys a query does not see (`all`: it sees every one), from running max m. A
 * query's max is raised only where the block's exceeds it by more than 2^8 in e^(score - max): its
 * probabilities then stay below 256 (no concern for float32 sums or bfloat16's relative rounding) and after
 * the first blocks the output is rarely rescaled (flash attention 4's conditional rescaling). Returned by
 * value (through pointers it cost the bf16 kernel 9%): the new max, rescale = e^(old - new) where raised and
 * 1 elsewhere, and which queries were raised. c is the softmax scale times log2(e). */
typedef struct {
    __m512 max, rescale;
    __mmask16 raised;
} prefill_max_step;

static inline prefill_max_step prefill_raise_max(const float *s, int64_t used, int64_t k0, int64_t first,
                                                 int64_t rows, int all, float c, __m512 m) {
    /* four maxima in turn: one would be a chain of vmaxps latencies, a key's whole share of the time */
    __m512 top0 = m, top1 = m, top2 = m, top3 = m;
    for (int64_t j = 0; j < used; j += 4) {
        __mmask16 k[4] = {0xffff, 0xffff, 0xffff, 0xffff};
        if (!all)
            for (int t = 0; t < 4; t++) k[t] = prefill_sees(k0 + j + t, first, rows);
        top0 = _mm512_mask_max_ps(top0, k[0], top0, _mm512_load_ps(s + j * 16));
        top1 = _mm512_mask_max_ps(top1, k[1], top1, _mm512_load_ps(s + j * 16 + 16));
        top2 = _mm512_mask_max_ps(top2, k[2], top2, _mm512_load_ps(s + j * 16 + 32));
        top3 = _mm512_mask_max_ps(top3, k[3], top3, _mm512_load_ps(s + j * 16 + 48));
    }
    const __m512 top = _mm512_max_ps(_mm512_max_ps(top0, top1), _mm512_max_ps(top2, top3)), vc = _mm512_set1_ps(c);
    prefill_max_step step;
    step.raised = _mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_sub_ps(top, m), vc), _mm512_set1_ps(8.0f), _CMP_GT_OQ);
    step.max = _mm512_mask_mov_ps(m, step.raised, top);
    step.rescale = step.raised ? exp2_16(_mm512_mul_ps(_mm512_sub_ps(m, step.max), vc)) : _mm512_set1_ps(1.0f);
    return step;
}

#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AMX 1

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles as 16 rows of 64 bytes (16 x 32 bfloat16, or 16 x 16 float32). Loaded at every kernel call:
 * oneDNN configures the tiles its own way between our calls. */
static inline void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.bytes_per_row[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}
#endif

#endif
