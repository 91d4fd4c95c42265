/* Prefill attention in float32 on AVX-512: one row's chunk of queries against the row's keys in the paged
 * pools, causal. Compiled with cpu_kernels.c into one library by server/engine/cpu_kernels.py.
 *
 * The layout of the AMX kernel (cpu_prefill.c), with FMAs for the products: one zmm register holds one key's
 * scores for 16 queries. S^T takes 8 keys at a time, each key's dim broadcast against the same dim of 16
 * queries; O^T takes 8 dims at a time, each key's value broadcast against its 16 probabilities; both for up to
 * three query heads of a group at once, which read the same keys. The softmax between them is vertical, and
 * keys come KEY_BLOCK_F32 at a time with flash attention's online softmax (see cpu_prefill.c).
 *
 * On the 2-core Xeon (one core's FMA peak about 236 GFLOP/s) one layer's attention for a 6,000-token prompt
 * in 512-token chunks took 254 ms here (each product at about 190 GFLOP/s), 313 ms with one query head a
 * pass, and torch's flash attention (MKL's sgemm inside) about 360-400 (from whole prefills: 21.0 s for the
 * prompt, 18.2 s with the one-head version, 17.7 s with this).
 */

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#ifdef HAVE_PREFILL_MATH
/* keys per pass over the chunk's queries: 16 KB of keys and 16 KB of values at a head size of 64 (32 and 128
 * keys took the same time within 3%) */
#define KEY_BLOCK_F32 64

/* The query blocks of one pass: up to SHARED blocks of the same 16 positions (query heads of one group), so
 * that each key's broadcast dim, or value, serves them all: 3 blocks x 8 keys or dims are 24 accumulators,
 * and 24 FMAs take 11 loads where one block took 17 for 16 (the FMA units waited on loads). */
#define SHARED 3

/* s_b [16 * nk keys, 16 queries] = K Q_b^T for the n blocks b: kt [keys, dim] row-major, qt_b [dim, 16] */
static inline __attribute__((always_inline)) void scores_f32(const float *const *qt, int n, const float *kt,
                                                             int64_t dim, int64_t nk, float *const *s) {
    for (int64_t j0 = 0; j0 < nk * 16; j0 += 8) {
        __m512 acc[SHARED][8];
        for (int b = 0; b < n; b++)
            for (int t = 0; t < 8; t++) acc[b][t] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d++) {
            __m512 qd[SHARED];
            for (int b = 0; b < n; b++) qd[b] = _mm512_load_ps(qt[b] + d * 16);
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m512 key = _mm512_set1_ps(kt[(j0 + t) * dim + d]);
                for (int b = 0; b < n; b++) acc[b][t] = _mm512_fmadd_ps(key, qd[b], acc[b][t]);
            }
        }
        for (int b = 0; b < n; b++)
            for (int t = 0; t < 8; t++) _mm512_store_ps(s[b] + (j0 + t) * 16, acc[b][t]);
    }
}

/* The online softmax's step, as block_softmax in cpu_prefill.c, over `used` keys (a multiple of 16); the
 * probabilities stay float32 and replace the scores in s. Returns the queries whose max was raised. */
static __mmask16 softmax_f32(float *s, int64_t used, int64_t k0, int64_t first, int64_t rows, int all, float c,
                             __m512 *m, __m512 *l, __m512 *rescale) {
    const prefill_max_step step = prefill_raise_max(s, used, k0, first, rows, all, c, *m);
    const __m512 vc = _mm512_set1_ps(c), shift = _mm512_mul_ps(step.max, _mm512_set1_ps(-c));
    __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
    for (int64_t j = 0; j < used; j += 2) {
        __m512 e0 = exp2_16(_mm512_fmadd_ps(_mm512_load_ps(s + j * 16), vc, shift));
        __m512 e1 = exp2_16(_mm512_fmadd_ps(_mm512_load_ps(s + j * 16 + 16), vc, shift));
        if (!all) {
            e0 = _mm512_maskz_mov_ps(prefill_sees(k0 + j, first, rows), e0);
            e1 = _mm512_maskz_mov_ps(prefill_sees(k0 + j + 1, first, rows), e1);
        }
        sum0 = _mm512_add_ps(sum0, e0);
        sum1 = _mm512_add_ps(sum1, e1);
        _mm512_store_ps(s + j * 16, e0);
        _mm512_store_ps(s + j * 16 + 16, e1);
    }
    *m = step.max, *rescale = step.rescale;
    *l = _mm512_fmadd_ps(*l, step.rescale, _mm512_add_ps(sum0, sum1));
    return step.raised;
}

/* o_b^T [dim, 16 queries] = rescale_b * o_b^T + V^T P_b^T over `used` keys for the n blocks b: vt [keys,
 * dim] row-major, p_b [keys, 16] */
static inline __attribute__((always_inline)) void values_f32(const float *const *p, int n, const float *vt,
                                                             int64_t dim, int64_t used, const __mmask16 *raise,
                                                             const __m512 *rescale, float *const *o) {
    for (int64_t d0 = 0; d0 < dim; d0 += 8) {
        __m512 acc[SHARED][8];
        for (int b = 0; b < n; b++)
            for (int t = 0; t < 8; t++) {
                acc[b][t] = _mm512_load_ps(o[b] + (d0 + t) * 16);
                if (raise[b]) acc[b][t] = _mm512_mul_ps(acc[b][t], rescale[b]);
            }
        for (int64_t j = 0; j < used; j++) {
            __m512 pj[SHARED];
            for (int b = 0; b < n; b++) pj[b] = _mm512_load_ps(p[b] + j * 16);
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m512 value = _mm512_set1_ps(vt[j * dim + d0 + t]);
                for (int b = 0; b < n; b++) acc[b][t] = _mm512_fmadd_ps(value, pj[b], acc[b][t]);
            }
        }
        for (int b = 0; b < n; b++)
            for (int t = 0; t < 8; t++) _mm512_store_ps(o[b] + (d0 + t) * 16, acc[b][t]);
    }
}

/* What one call's key blocks share (as prefill_plan in cpu_prefill.c). */
typedef struct {
    int64_t width, chunk, tblocks, dim, group;
    float c;               /* the softmax scale times log2(e) */
    float *qt, *kt, *vt;   /* [nq, dim, 16] query blocks^T; [KEY_BLOCK_F32, dim] keys and values */
    float *o, *ml, *s;     /* [nq, dim, 16] outputs^T; [nq, 2, 16] maxima, sums; [SHARED, KEY_BLOCK_F32, 16] */
} prefill_plan_f32;

/* Blocks g0 .. g0 + n - 1 of the group's query heads, at 16-query block tb, against the key block at k0. */
static inline __attribute__((always_inline)) void shared_pass(const prefill_plan_f32 *pl, int64_t tb, int64_t g0,
                                                              int n, int64_t k0, int64_t avail) {
    const int64_t t0 = tb * 16, rows = pl->chunk - t0 < 16 ? pl->chunk - t0 : 16;
    const int64_t first = pl->width - pl->chunk + t0; /* the blocks' first query's position */
    int64_t seen = first + rows - k0;                /* keys of this block their last query sees */
    if (seen <= 0) return;
    seen = seen < avail ? seen : avail;
    const int64_t used = (seen + 15) / 16 * 16;
    const int all = rows == 16 && k0 + used - 1 <= first;
    const float *qt[SHARED];
    float *s[SHARED], *o[SHARED];
    __mmask16 raise[SHARED];
    __m512 rescale[SHARED];
    for (int b = 0; b < n; b++) {
        const int64_t i = (g0 + b) * pl->tblocks + tb;
        qt[b] = pl->qt + i * pl->dim * 16, s[b] = pl->s + b * KEY_BLOCK_F32 * 16, o[b] = pl->o + i * pl->dim * 16;
    }
    scores_f32(qt, n, pl->kt, pl->dim, used / 16, s);
    for (int b = 0; b < n; b++) {
        float *ml = pl->ml + ((g0 + b) * pl->tblocks + tb) * 32;
        __m512 m = _mm512_load_ps(ml), l = _mm512_load_ps(ml + 16);
        raise[b] = softmax_f32(s[b], used, k0, first, rows, all, pl->c, &m, &l, &rescale[b]);
        _mm512_store_ps(ml, m);
        _mm512_store_ps(ml + 16, l);
    }
    values_f32((const float *const *)s, n, pl->vt, pl->dim, used, raise, rescale, o);
}

static void key_block_pass_f32(const prefill_plan_f32 *pl, int64_t k0, int64_t avail) {
    for (int64_t tb = 0; tb < pl->tblocks; tb++)
        for (int64_t g0 = 0; g0 < pl->group; g0 += SHARED) {
            const int64_t n = pl->group - g0 < SHARED ? pl->group - g0 : SHARED;
            if (n == 3) shared_pass(pl, tb, g0, 3, k0, avail); /* literal counts: unrolled, in registers */
            else if (n == 2) shared_pass(pl, tb, g0, 2, k0, avail);
            else shared_pass(pl, tb, g0, 1, k0, avail);
        }
}

/* As prefill_attention_bf16 (cpu_prefill.c), in float32: dim a multiple of 16 up to 256. */
int prefill_attention_f32(const float *q, int64_t q_token, int64_t q_head, const float *k, const float *v,
                          const int64_t *slots, int64_t width, int64_t chunk, int64_t heads, int64_t kv_heads,
                          int64_t dim, float scale, float *out, int64_t out_token) {
    if (dim % 16 || dim > 256 || kv_heads < 1 || heads % kv_heads || chunk < 1 || chunk > width) return -1;
    const int64_t group = heads / kv_heads, stride = kv_heads * dim, tblocks = (chunk + 15) / 16;
    const int64_t nq = group * tblocks;
    prefill_plan_f32 pl = {width, chunk, tblocks, dim, group, scale * 1.44269504088896341f,
                           aligned_alloc(64, (size_t)(nq * dim * 64)), aligned_alloc(64, KEY_BLOCK_F32 * dim * 4),
                           aligned_alloc(64, KEY_BLOCK_F32 * dim * 4), aligned_alloc(64, (size_t)(nq * dim * 64)),
                           aligned_alloc(64, (size_t)(nq * 128)), aligned_alloc(64, SHARED * KEY_BLOCK_F32 * 64)};
    int status = 0;
    if (!pl.qt || !pl.kt || !pl.vt || !pl.o || !pl.ml || !pl.s) {
        status = -2;
        goto done;
    }
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i at_q = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int)q_token));
    const __m512i at_out = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int)out_token));
    for (int64_t kh = 0; kh < kv_heads; kh++) {
        memset(pl.o, 0, (size_t)(nq * dim * 64));
        for (int64_t i = 0; i < nq; i++) { /* query block i: head kh * group + i / tblocks, a gather per dim */
            const int64_t h = kh * group + i / tblocks, t0 = i % tblocks * 16;
            const __mmask16 keep = (__mmask16)((1u << (chunk - t0 < 16 ? chunk - t0 : 16)) - 1);
            for (int64_t d = 0; d < dim; d++)
                _mm512_store_ps(pl.qt + (i * dim + d) * 16, _mm512_mask_i32gather_ps(
                    _mm512_setzero_ps(), keep, at_q, q + t0 * q_token + h * q_head + d, 4));
            _mm512_store_ps(pl.ml + i * 32, _mm512_set1_ps(-FLT_MAX)); /* as in cpu_prefill.c */
            _mm512_store_ps(pl.ml + i * 32 + 16, _mm512_setzero_ps());
        }
        for (int64_t k0 = 0; k0 < width; k0 += KEY_BLOCK_F32) {
            const int64_t avail = width - k0 < KEY_BLOCK_F32 ? width - k0 : KEY_BLOCK_F32;
            memset(pl.kt, 0, KEY_BLOCK_F32 * dim * 4);
            memset(pl.vt, 0, KEY_BLOCK_F32 * dim * 4); /* 0 x garbage could be NaN */
            for (int64_t j = 0; j < avail; j++) {
                memcpy(pl.kt + j * dim, k + slots[k0 + j] * stride + kh * dim, (size_t)dim * 4);
                memcpy(pl.vt + j * dim, v + slots[k0 + j] * stride + kh * dim, (size_t)dim * 4);
            }
            key_block_pass_f32(&pl, k0, avail);
        }
        for (int64_t i = 0; i < nq; i++) { /* out = o^T / l, a scatter per dim */
            const int64_t h = kh * group + i / tblocks, t0 = i % tblocks * 16;
            const __mmask16 keep = (__mmask16)((1u << (chunk - t0 < 16 ? chunk - t0 : 16)) - 1);
            const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_load_ps(pl.ml + i * 32 + 16));
            for (int64_t d = 0; d < dim; d++)
                _mm512_mask_i32scatter_ps(out + t0 * out_token + h * dim + d, keep, at_out,
                                          _mm512_mul_ps(_mm512_load_ps(pl.o + (i * dim + d) * 16), inv), 4);
        }
    }
done:
    free(pl.qt), free(pl.kt), free(pl.vt), free(pl.o), free(pl.ml), free(pl.s);
    return status;
}
#else
/* Without AVX-512 torch's flash attention keeps every float32 prefill chunk. */
int prefill_attention_f32(const float *q, int64_t q_token, int64_t q_head, const float *k, const float *v,
                          const int64_t *slots, int64_t width, int64_t chunk, int64_t heads, int64_t kv_heads,
                          int64_t dim, float scale, float *out, int64_t out_token) {
    (void)q, (void)q_token, (void)q_head, (void)k, (void)v, (void)slots, (void)width, (void)chunk, (void)heads;
    (void)kv_heads, (void)dim, (void)scale, (void)out, (void)out_token;
    return -1;
}
#endif
