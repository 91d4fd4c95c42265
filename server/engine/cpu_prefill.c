/* Prefill attention on AMX tiles: one row's chunk of queries against the row's keys in the paged pools,
 * causal, bfloat16. Compiled with cpu_kernels.c into one library by server/engine/cpu_kernels.py.
 *
 * torch's CPU flash attention computed a 6,000-token prompt's attention at about 350 GFLOP/s on the 2-core
 * Xeon (3.6 s of its 6.5 s prefill). Here both products are tile ops, computed transposed so that one zmm
 * register holds one key's scores for 16 queries: S^T = K Q^T (16 keys x 32 dims of K times 32 dims x 16
 * queries), O^T += V^T P^T (16 dims x 32 keys of V^T times 32 keys x 16 queries). The softmax between them
 * is then all vertical: a key block's max, sum and rescale for 16 queries are one register each. The
 * query-major version before it (a query's scores in a row, an exact two-pass softmax over the whole row)
 * needed a horizontal max and sum per query, and its rows outgrew L2 past a few thousand keys: one layer's
 * attention for a 6,000-token prompt (512-token chunks) took 103 ms there and 63 ms here.
 *
 * The softmax is flash attention's online one: keys are taken KEY_BLOCK at a time (the outer loop, packed
 * once and met by every query block of the chunk while they are in cache); each 16-query block carries its
 * float32 output, running max and sum from one key block to the next.
 */

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(HAVE_AMX) && defined(HAVE_PREFILL_MATH)
/* Keys per pass over the chunk's queries (a multiple of 32). At a head size of 64 a pass's packed keys and
 * values, scores and probabilities take 22 KB, within L1 with a query block's own data. The 6,000-token
 * layer above, before the conditional rescale: 32 keys 1.28x the time of 64, 128 keys 1.03x, 256 1.24x. */
#define KEY_BLOCK 64

/* One key/value head's keys k0 .. k0 + avail - 1 of the row, as the A operands of S^T = K Q^T: kt [KEY_BLOCK,
 * padded], a key's dims contiguous and zero-padded to `padded` (a head size of 16 or 48 fills part of a
 * 32-dim step); keys past avail are zero. And its values as the A operands of O^T = V^T P^T: block (b, c)
 * of vt holds dims 16c..16c+15 by keys 32b..32b+31, each dim's keys contiguous (zero past avail: 0 x
 * garbage could be NaN). */
static void pack_block(const uint16_t *k, const uint16_t *v, const int64_t *slots, int64_t avail, int64_t stride,
                       int64_t dim, int64_t padded, uint16_t *kt, uint16_t *vt) {
    const int64_t vdepth = dim / 16;
    memset(kt, 0, (size_t)(KEY_BLOCK * padded * 2));
    for (int64_t j = 0; j < avail; j++) memcpy(kt + j * padded, k + slots[j] * stride, (size_t)dim * 2);
    /* V^T by gathers: 8 keys' (d, d + 1) pairs a gather, 32 keys' in four, split into dim d's 32 keys (the
     * even 16-bit lanes) and d + 1's (the odd); the scalar transpose was a tenth of the kernel's time */
    const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28,
                                          26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t b = 0; b < KEY_BLOCK / 32; b++) {
        __m512i rows[4];
        __mmask8 keep[4];
        for (int g = 0; g < 4; g++) {
            int64_t at[8];
            keep[g] = 0;
            for (int t = 0; t < 8; t++) {
                const int64_t j = b * 32 + g * 8 + t;
                at[t] = j < avail ? slots[j] * stride : 0;
                keep[g] |= (__mmask8)((j < avail) << t);
            }
            rows[g] = _mm512_loadu_si512(at);
        }
        for (int64_t e = 0; e < dim; e += 2) {
            __m256i part[4];
            for (int g = 0; g < 4; g++)
                part[g] = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), keep[g], rows[g], v + e, 2);
            const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(part[0]), part[1], 1);
            const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(part[2]), part[3], 1);
            uint16_t *block = vt + (b * vdepth + e / 16) * 512 + e % 16 * 32;
            _mm512_store_si512((__m512i *)block, _mm512_permutex2var_epi16(lo, even, hi));
            _mm512_store_si512((__m512i *)(block + 32), _mm512_permutex2var_epi16(lo, odd, hi));
        }
    }
}

/* A query block's B operands for S^T = K Q^T: qt [kdepth, 16 dim pairs, 16 queries, 2], query n's dims
 * 32c + 2 pair + {0, 1} at (c, pair, n), a gather of 16 queries' pairs each; queries past `rows` and dims
 * past `dim` are zero. */
static void pack_queries(const uint16_t *q, int64_t q_token, int64_t rows, int64_t dim, int64_t kdepth,
                         uint16_t *qt) {
    const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)q_token));
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int64_t e = 0; e < kdepth * 32; e += 2)
        _mm512_store_si512((__m512i *)(qt + e / 32 * 512 + e % 32 * 16),
                           e < dim ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), keep, at, q + e, 2)
                                   : _mm512_setzero_si512());
}

/* S^T [16 * nk keys, 16 queries] float32 into s (a key's 16 scores contiguous), nk 16-key blocks. */
static void block_scores(const uint16_t *qt, const uint16_t *kt, int64_t padded, int64_t kdepth, int64_t nk,
                         float *s) {
    for (int64_t b = 0; b < nk; b += 4) { /* four 16-key blocks a pass */
        const int64_t n = nk - b < 4 ? nk - b : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < kdepth; c++) {
            const uint16_t *kc = kt + b * 16 * padded + c * 32;
            _tile_loadd(6, qt + c * 512, 64);
            _tile_loadd(4, kc, padded * 2);
            _tile_dpbf16ps(0, 4, 6);
            if (n > 1) {
                _tile_loadd(5, kc + 16 * padded, padded * 2);
                _tile_dpbf16ps(1, 5, 6);
            }
            if (n > 2) {
                _tile_loadd(7, kc + 32 * padded, padded * 2);
                _tile_dpbf16ps(2, 7, 6);
            }
            if (n > 3) {
                _tile_loadd(4, kc + 48 * padded, padded * 2);
                _tile_dpbf16ps(3, 4, 6);
            }
        }
        _tile_stored(0, s + b * 256, 64);
        if (n > 1) _tile_stored(1, s + (b + 1) * 256, 64);
        if (n > 2) _tile_stored(2, s + (b + 2) * 256, 64);
        if (n > 3) _tile_stored(3, s + (b + 3) * 256, 64);
    }
}

/* The 16-bit lanes that interleave two 16-lane halves: lane 2n from lane n of the low half, 2n + 1 from
 * lane n of the high (a pair of keys for each of 16 queries, or a pair of dims). */
static inline __m512i pair_lanes(void) {
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
                            4, 19, 3, 18, 2, 17, 1, 16, 0);
}

/* The online softmax's step over one key block for 16 queries: `used` keys of s (a multiple of 32; keys a
 * query does not see count as absent). Raises the running max *m where the block's is well above it
 * (prefill_raise_max, cpu_kernels.h), with *rescale = e^(old max - new max) for what earlier blocks left in the
 * output (returning which queries'), updates the sum *l, and writes p, the probabilities e^(score - max)
 * rounded to bfloat16 (as SDPA rounds them) as the B operands of O^T = V^T P^T: [used / 2 key pairs, 16
 * queries, 2]. c is the softmax scale times log2(e). `all` says every query sees every used key. */
static __mmask16 block_softmax(const float *s, uint16_t *p, int64_t used, int64_t k0, int64_t first,
                               int64_t rows, int all, float c, __m512 *m, __m512 *l, __m512 *rescale) {
    const prefill_max_step step = prefill_raise_max(s, used, k0, first, rows, all, c, *m);
    const __m512 vc = _mm512_set1_ps(c), shift = _mm512_mul_ps(step.max, _mm512_set1_ps(-c));
    const __m512i pairs = pair_lanes();
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
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0); /* e0's 16 bfloat16, then e1's */
        _mm512_store_si512((__m512i *)(p + j * 16), _mm512_permutexvar_epi16(pairs, both));
    }
    *m = step.max, *rescale = step.rescale;
    *l = _mm512_fmadd_ps(*l, step.rescale, _mm512_add_ps(sum0, sum1));
    return step.raised;
}

/* o^T [dim, 16 queries] float32 = rescale * o^T + V^T P^T over `used` keys: the tiles load o^T as their
 * accumulators and store it back, and the rescale is a pass of its own only where a max was raised. */
static void block_values(const uint16_t *p, const uint16_t *vt, int64_t vdepth, int64_t used, __mmask16 raise,
                         __m512 rescale, float *o) {
    if (raise)
        for (int64_t d = 0; d < vdepth * 16; d++)
            _mm512_store_ps(o + d * 16, _mm512_mul_ps(_mm512_load_ps(o + d * 16), rescale));
    for (int64_t c = 0; c < vdepth; c += 4) { /* four 16-dim blocks a pass */
        const int64_t n = vdepth - c < 4 ? vdepth - c : 4;
        float *oc = o + c * 256;
        _tile_loadd(0, oc, 64);
        if (n > 1) _tile_loadd(1, oc + 256, 64);
        if (n > 2) _tile_loadd(2, oc + 512, 64);
        if (n > 3) _tile_loadd(3, oc + 768, 64);
        for (int64_t b = 0; b < used / 32; b++) {
            const uint16_t *vc = vt + (b * vdepth + c) * 512;
            _tile_loadd(4, p + b * 512, 64);
            _tile_loadd(5, vc, 64);
            _tile_dpbf16ps(0, 5, 4);
            if (n > 1) {
                _tile_loadd(6, vc + 512, 64);
                _tile_dpbf16ps(1, 6, 4);
            }
            if (n > 2) {
                _tile_loadd(7, vc + 1024, 64);
                _tile_dpbf16ps(2, 7, 4);
            }
            if (n > 3) {
                _tile_loadd(5, vc + 1536, 64);
                _tile_dpbf16ps(3, 5, 4);
            }
        }
        _tile_stored(0, oc, 64);
        if (n > 1) _tile_stored(1, oc + 256, 64);
        if (n > 2) _tile_stored(2, oc + 512, 64);
        if (n > 3) _tile_stored(3, oc + 768, 64);
    }
}

/* What one call's key blocks share. */
typedef struct {
    int64_t width, chunk, tblocks, nq, kdepth, padded, vdepth;
    float c;          /* the softmax scale times log2(e) */
    uint16_t *qt;     /* [nq, kdepth * 512] the query blocks of one key/value head (pack_queries) */
    uint16_t *kt;     /* [KEY_BLOCK, padded] and the values, packed (pack_block) */
    uint16_t *vt, *p; /* p: [KEY_BLOCK * 16] probabilities (block_softmax) */
    float *o, *ml;    /* [nq, dim, 16] outputs^T; [nq, 2, 16] running maxima and sums */
    float *s;         /* [KEY_BLOCK, 16] scores^T */
} prefill_plan;

/* Every query block against the key block at k0 (avail keys). */
static void key_block_pass(const prefill_plan *pl, int64_t k0, int64_t avail) {
    const int64_t dim = pl->vdepth * 16;
    for (int64_t i = 0; i < pl->nq; i++) { /* query block i: head group member i / tblocks */
        const int64_t t0 = i % pl->tblocks * 16, rows = pl->chunk - t0 < 16 ? pl->chunk - t0 : 16;
        const int64_t first = pl->width - pl->chunk + t0; /* the block's first query's position */
        int64_t seen = first + rows - k0;                /* keys of this block its last query sees */
        if (seen <= 0) continue;
        seen = seen < avail ? seen : avail;
        const int64_t nk = (seen + 15) / 16, used = (seen + 31) / 32 * 32;
        block_scores(pl->qt + i * pl->kdepth * 512, pl->kt, pl->padded, pl->kdepth, nk, pl->s);
        if (used > nk * 16) memset(pl->s + nk * 256, 0, 1024); /* read, masked out */
        const int all = rows == 16 && k0 + used - 1 <= first;
        __m512 m = _mm512_load_ps(pl->ml + i * 32), l = _mm512_load_ps(pl->ml + i * 32 + 16);
        __m512 rescale;
        const __mmask16 raise = block_softmax(pl->s, pl->p, used, k0, first, rows, all, pl->c, &m, &l, &rescale);
        _mm512_store_ps(pl->ml + i * 32, m);
        _mm512_store_ps(pl->ml + i * 32 + 16, l);
        block_values(pl->p, pl->vt, pl->vdepth, used, raise, rescale, pl->o + i * dim * 16);
    }
}

/* out[t0 + n, h, :] = o^T[:, n] / l[n] in bfloat16, for the block's `rows` queries: dims d and d + 1 of 16
 * queries interleaved as P is (block_softmax), then scattered as 16 pairs */
static void write_block(const float *o, const float *l, int64_t dim, int64_t rows, uint16_t *out,
                        int64_t out_token) {
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_load_ps(l));
    const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)out_token));
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int64_t d = 0; d < dim; d += 2) {
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_load_ps(o + d * 16 + 16), inv),
                                                          _mm512_mul_ps(_mm512_load_ps(o + d * 16), inv));
        _mm512_mask_i32scatter_epi32(out + d, keep, at, _mm512_permutexvar_epi16(pair_lanes(), both), 2);
    }
}

/* q:     the chunk's queries, element (t, h, d) at q[t * q_token + h * q_head + d]
 * k, v:  the layer's slot-major pools [N, kv_heads, dim], contiguous
 * slots: [width] the row's slots by position; the chunk's queries are positions width - chunk .. width - 1
 * out:   [chunk, heads, dim], element (t, h, d) at out[t * out_token + h * dim + d]
 * Query head h reads key/value head h / (heads / kv_heads). Returns 0; -1 for shapes it does not take (dim
 * a multiple of 16 up to 256, 1 <= chunk <= width); -2 when scratch memory could not be had. */
int prefill_attention_bf16(const uint16_t *q, int64_t q_token, int64_t q_head, const uint16_t *k,
                           const uint16_t *v, const int64_t *slots, int64_t width, int64_t chunk, int64_t heads,
                           int64_t kv_heads, int64_t dim, float scale, uint16_t *out, int64_t out_token) {
    if (dim % 16 || dim > 256 || kv_heads < 1 || heads % kv_heads || chunk < 1 || chunk > width) return -1;
    const int64_t group = heads / kv_heads, stride = kv_heads * dim, tblocks = (chunk + 15) / 16;
    const int64_t nq = group * tblocks, kdepth = (dim + 31) / 32, padded = kdepth * 32;
    prefill_plan pl = {width, chunk, tblocks, nq, kdepth, padded, dim / 16, scale * 1.44269504088896341f,
                       aligned_alloc(64, (size_t)(nq * kdepth * 1024)), aligned_alloc(64, KEY_BLOCK * padded * 2),
                       aligned_alloc(64, KEY_BLOCK * dim * 2), aligned_alloc(64, KEY_BLOCK * 32),
                       aligned_alloc(64, (size_t)(nq * dim * 64)), aligned_alloc(64, (size_t)(nq * 128)),
                       aligned_alloc(64, KEY_BLOCK * 64)};
    int status = 0;
    if (!pl.qt || !pl.kt || !pl.vt || !pl.p || !pl.o || !pl.ml || !pl.s) {
        status = -2;
        goto done;
    }
    amx_configure();
    for (int64_t kh = 0; kh < kv_heads; kh++) {
        memset(pl.o, 0, (size_t)(nq * dim * 64));
        for (int64_t i = 0; i < nq; i++) {
            const int64_t h = kh * group + i / tblocks, t0 = i % tblocks * 16;
            pack_queries(q + t0 * q_token + h * q_head, q_token, chunk - t0 < 16 ? chunk - t0 : 16, dim, kdepth,
                         pl.qt + i * kdepth * 512);
            /* -FLT_MAX, not -inf: the first rescale is then e^(-huge) = 0, never e^(-inf + inf) */
            _mm512_store_ps(pl.ml + i * 32, _mm512_set1_ps(-FLT_MAX));
            _mm512_store_ps(pl.ml + i * 32 + 16, _mm512_setzero_ps());
        }
        for (int64_t k0 = 0; k0 < width; k0 += KEY_BLOCK) {
            const int64_t avail = width - k0 < KEY_BLOCK ? width - k0 : KEY_BLOCK;
            pack_block(k + kh * dim, v + kh * dim, slots + k0, avail, stride, dim, padded, pl.kt, pl.vt);
            key_block_pass(&pl, k0, avail);
        }
        for (int64_t i = 0; i < nq; i++) {
            const int64_t h = kh * group + i / tblocks, t0 = i % tblocks * 16;
            write_block(pl.o + i * dim * 16, pl.ml + i * 32 + 16, dim, chunk - t0 < 16 ? chunk - t0 : 16,
                        out + t0 * out_token + h * dim, out_token);
        }
    }
    _tile_release();
done:
    free(pl.qt), free(pl.kt), free(pl.vt), free(pl.p), free(pl.o), free(pl.ml), free(pl.s);
    return status;
}
#else
/* Without AMX torch's flash attention keeps every prefill chunk. */
int prefill_attention_bf16(const uint16_t *q, int64_t q_token, int64_t q_head, const uint16_t *k,
                           const uint16_t *v, const int64_t *slots, int64_t width, int64_t chunk, int64_t heads,
                           int64_t kv_heads, int64_t dim, float scale, uint16_t *out, int64_t out_token) {
    (void)q, (void)q_token, (void)q_head, (void)k, (void)v, (void)slots, (void)width, (void)chunk, (void)heads;
    (void)kv_heads, (void)dim, (void)scale, (void)out, (void)out_token;
    return -1;
}
#endif
