/* Prefill attention on AMX tiles: one row's chunk of queries against the row's keys in the paged pools,
 * causal, bfloat16. Compiled with cpu_kernels.c into one library by server/engine/cpu_kernels.py.
 *
 * torch's CPU flash attention computed a 6,000-token prompt's attention at about 350 GFLOP/s on the 2-core
 * Xeon (3.6 s of its 6.5 s prefill), while the AMX linears of the same prefill ran at 930-1,300. Here both
 * products are tile ops (16 queries x 32 dims of Q times 32 dims x 16 keys of K^T; 16 queries x 32 keys of
 * P times 32 keys x 16 dims of V), and the softmax between them is exact, two passes over a block's scores
 * (max, then exponentials and their sum), not flash attention's running rescale: a block of 16 queries keeps
 * its scores against every visible key (16 x width float32, in L2 for a few thousand keys).
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#ifdef HAVE_AMX
/* One key/value head's keys in the blocks S = Q K^T reads: block (b, c) holds keys 16b..16b+15 by dims
 * 32c..32c+31 as 16 rows of dim pairs, each row every key's pair. Keys past `width` and dims past `dim` (a
 * head size of 16 or 48 fills half a block) are zero. */
static void pack_keys(const uint16_t *pool, const int64_t *slots, int64_t width, int64_t blocks,
                      int64_t stride, int64_t dim, uint32_t *out) {
    const int64_t depth = (dim + 31) / 32, pairs = dim / 2;
    for (int64_t b = 0; b < blocks; b++)
        for (int key = 0; key < 16; key++) {
            int64_t j = b * 16 + key;
            const uint32_t *src = j < width ? (const uint32_t *)(pool + slots[j] * stride) : NULL;
            for (int64_t c = 0; c < depth; c++) {
                uint32_t *block = out + (b * depth + c) * 256; /* 16 x 16 pairs */
                for (int pair = 0; pair < 16; pair++)
                    block[pair * 16 + key] = src && c * 16 + pair < pairs ? src[c * 16 + pair] : 0;
            }
        }
}

/* Its values in the blocks O = P V reads: block (b, c) holds keys 32b..32b+31 by dims 16c..16c+15 as 16
 * rows of key pairs, each row every dim's pair. Keys past `width` are zero (0 x garbage could be NaN). */
static void pack_values(const uint16_t *pool, const int64_t *slots, int64_t width, int64_t blocks,
                        int64_t stride, int64_t dim, uint16_t *out) {
    const int64_t depth = dim / 16;
    for (int64_t b = 0; b < blocks; b++)
        for (int pair = 0; pair < 16; pair++)
            for (int t = 0; t < 2; t++) {
                int64_t j = b * 32 + pair * 2 + t;
                const uint16_t *src = j < width ? pool + slots[j] * stride : NULL;
                for (int64_t c = 0; c < depth; c++) {
                    uint16_t *block = out + (b * depth + c) * 512;
                    for (int d = 0; d < 16; d++) block[pair * 32 + d * 2 + t] = src ? src[c * 16 + d] : 0;
                }
            }
}

/* e^x for x <= 0, 16 lanes: exp_nonpositive's polynomial (cpu_kernels.h) on AVX-512, with the power of two
 * applied by vscalefps. gcc vectorised the scalar one at 256 bits, and the exponentials were most of the
 * kernel's time. max(-87, x) keeps a NaN (vmaxps returns its second operand when either is NaN). */
static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_C6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C0));
    return _mm512_scalef_ps(p, n);
}

/* scores [16, span] of one query block -> probabilities p [16, span] (bfloat16, exactly zero past each
 * query's visible keys, up to `used`), returning each row's sum in `sums`; rows past `rows` are all zero.
 * Query r sees keys 0..first + r. One pass after the row's max. */
static void softmax_block(const float *scores, uint16_t *p, int64_t span, int64_t used, int rows,
                          int64_t first, float scale, float *sums) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int r = 0; r < 16; r++) {
        const float *s = scores + r * span;
        uint16_t *pr = p + r * span;
        if (r >= rows) {
            memset(pr, 0, (size_t)used * 2);
            sums[r] = 1.0f;
            continue;
        }
        const int64_t see = first + r + 1;
        const __m512 m = _mm512_set1_ps(max_f32(s, see));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < used; j += 16) {
            __mmask16 keep = see - j >= 16 ? 0xffff : see > j ? (__mmask16)((1u << (see - j)) - 1) : 0;
            __m512 e = _mm512_maskz_mov_ps(keep, exp16_nonpositive(
                _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, s + j), m), vscale)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr + j), round16(e));
        }
        sums[r] = _mm512_reduce_add_ps(sum);
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
    const int64_t group = heads / kv_heads, stride = kv_heads * dim, kblocks = (width + 15) / 16;
    const int64_t vblocks = (width + 31) / 32, span = vblocks * 32, vdepth = dim / 16;
    const int64_t kdepth = (dim + 31) / 32, padded = kdepth * 32; /* the products' depth, zero-padded */
    uint32_t *kt = aligned_alloc(64, (size_t)(kblocks * 16 * padded * 2));
    uint16_t *vt = aligned_alloc(64, (size_t)(span * dim * 2)), *p = aligned_alloc(64, (size_t)(16 * span * 2));
    uint16_t *qb = aligned_alloc(64, (size_t)(16 * padded * 2));
    float *scores = aligned_alloc(64, (size_t)(16 * span * 4));
    float tile[256] __attribute__((aligned(64))), sums[16];
    int status = 0;
    if (!kt || !vt || !p || !qb || !scores) {
        status = -2;
        goto done;
    }
    amx_configure();
    for (int64_t kh = 0; kh < kv_heads; kh++) {
        pack_keys(k + kh * dim, slots, width, kblocks, stride, dim, kt);
        pack_values(v + kh * dim, slots, width, vblocks, stride, dim, vt);
        for (int64_t h = kh * group; h < (kh + 1) * group; h++)
            for (int64_t t0 = 0; t0 < chunk; t0 += 16) {
                const int rows = chunk - t0 < 16 ? (int)(chunk - t0) : 16;
                memset(qb, 0, (size_t)(16 * padded * 2));
                for (int r = 0; r < rows; r++)
                    memcpy(qb + r * padded, q + (t0 + r) * q_token + h * q_head, (size_t)dim * 2);
                const int64_t first = width - chunk + t0;      /* the block's first query's position */
                const int64_t visible = first + rows;          /* keys its last query sees */
                const int64_t nk = (visible + 15) / 16, used = (visible + 31) / 32 * 32;
                for (int64_t b = 0; b < nk; b += 4) { /* S = Q K^T, four 16-key blocks a pass */
                    const int64_t n = nk - b < 4 ? nk - b : 4;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t c = 0; c < kdepth; c++) {
                        const uint32_t *kc = kt + (b * kdepth + c) * 256;
                        _tile_loadd(4, qb + c * 32, padded * 2);
                        _tile_loadd(5, kc, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        if (n > 1) {
                            _tile_loadd(6, kc + kdepth * 256, 64);
                            _tile_dpbf16ps(1, 4, 6);
                        }
                        if (n > 2) {
                            _tile_loadd(7, kc + 2 * kdepth * 256, 64);
                            _tile_dpbf16ps(2, 4, 7);
                        }
                        if (n > 3) {
                            _tile_loadd(5, kc + 3 * kdepth * 256, 64);
                            _tile_dpbf16ps(3, 4, 5);
                        }
                    }
                    _tile_stored(0, scores + b * 16, span * 4);
                    if (n > 1) _tile_stored(1, scores + (b + 1) * 16, span * 4);
                    if (n > 2) _tile_stored(2, scores + (b + 2) * 16, span * 4);
                    if (n > 3) _tile_stored(3, scores + (b + 3) * 16, span * 4);
                }
                softmax_block(scores, p, span, used, rows, first, scale, sums);
                for (int64_t c = 0; c < vdepth; c += 4) { /* O = P V, four 16-dim blocks a pass */
                    const int64_t n = vdepth - c < 4 ? vdepth - c : 4;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t b = 0; b < used / 32; b++) {
                        const uint16_t *vc = vt + (b * vdepth + c) * 512;
                        _tile_loadd(4, p + b * 32, span * 2);
                        _tile_loadd(5, vc, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        if (n > 1) {
                            _tile_loadd(6, vc + 512, 64);
                            _tile_dpbf16ps(1, 4, 6);
                        }
                        if (n > 2) {
                            _tile_loadd(7, vc + 1024, 64);
                            _tile_dpbf16ps(2, 4, 7);
                        }
                        if (n > 3) {
                            _tile_loadd(5, vc + 1536, 64);
                            _tile_dpbf16ps(3, 4, 5);
                        }
                    }
                    for (int64_t i = 0; i < n; i++) {
                        switch (i) { /* tile numbers are immediates */
                        case 0: _tile_stored(0, tile, 64); break;
                        case 1: _tile_stored(1, tile, 64); break;
                        case 2: _tile_stored(2, tile, 64); break;
                        default: _tile_stored(3, tile, 64); break;
                        }
                        for (int r = 0; r < rows; r++) {
                            __m512 o = _mm512_mul_ps(_mm512_load_ps(tile + r * 16), _mm512_set1_ps(1.0f / sums[r]));
                            _mm256_storeu_si256((__m256i *)(out + (t0 + r) * out_token + h * dim + (c + i) * 16),
                                                round16(o));
                        }
                    }
                }
            }
    }
    _tile_release();
done:
    free(kt), free(vt), free(p), free(qb), free(scores);
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
