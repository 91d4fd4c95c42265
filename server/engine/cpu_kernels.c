/* CPU kernels for the engine's hot loop, compiled at first use by server/engine/cpu_kernels.py.
 *
 * Plain C with no torch headers (so it compiles in about a second), called through ctypes with raw
 * pointers. Every function computes in float32 whatever the storage type; bfloat16 is read by widening its
 * 16 bits and written with round-to-nearest-even, as torch does. The loops are written so that gcc -O3
 * -march=native vectorises them (-ffast-math lets it reorder the float sums; -fno-finite-math-only keeps
 * NaN and inf meaning what they mean, so a broken prefix still yields NaN logits).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

/* 16 floats: gcc lowers these vector-extension ops to one AVX-512 register, two AVX2 ones, or scalars. */
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
#define LANES 16

static inline f32x16 load16_f32(const float *p) {
    f32x16 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline f32x16 load16_bf16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    f32x16 x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The sum of x's 16 lanes as a tree (4 permutes and adds) instead of a 15-add chain. */
static inline float sum16(f32x16 x) {
    x += __builtin_shuffle(x, (u32x16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    x += __builtin_shuffle(x, (u32x16){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    x += __builtin_shuffle(x, (u32x16){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    x += __builtin_shuffle(x, (u32x16){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
    return x[0];
}

#define MAX_GROUP 8   /* query heads per key/value head that get their own unrolled loops */
#define MAX_CHUNKS 16 /* head dims up to 256 */

/* One row: its heads' queries (qf [kv_heads * G, dim], already scaled) against the n keys and values at
 * `slots`, written to o ([kv_heads * G, dim]). Each pass walks the row's slots once and reads every key/value
 * head of a slot together (one contiguous run of kv_heads * dim), so the pool streams once per pass instead of
 * once per head. scores: scratch [kv_heads * G, n]; acc: scratch [kv_heads * G, dim]. G is a constant in
 * every call below, so a slot's per-query partial sums stay in registers. dim % 16 == 0, dim <= 256. */
#define ATTEND_ROW(NAME, T, LOAD16, STORE)                                                                \
    static inline __attribute__((always_inline)) void NAME(                                               \
        const int G, const float *restrict qf, const T *restrict k, const T *restrict v,                  \
        const int64_t *restrict slots, int64_t n, int64_t kv_heads, int64_t dim, float *restrict scores,  \
        float *restrict acc, T *restrict o) {                                                              \
        const int64_t chunks = dim / LANES, stride = kv_heads * dim, queries = kv_heads * G;               \
        for (int64_t j = 0; j < n; j++) {                                                                  \
            const T *kp = k + slots[j] * stride;                                                           \
            for (int64_t kh = 0; kh < kv_heads; kh++) {                                                    \
                f32x16 part[MAX_GROUP];                                                                    \
                for (int g = 0; g < G; g++) part[g] = (f32x16){0};                                        \
                for (int64_t c = 0; c < chunks; c++) {                                                     \
                    f32x16 x = LOAD16(kp + kh * dim + c * LANES);                                          \
                    for (int g = 0; g < G; g++)                                                            \
                        part[g] += load16_f32(qf + (kh * G + g) * dim + c * LANES) * x;                    \
                }                                                                                          \
                for (int g = 0; g < G; g++) scores[(kh * G + g) * n + j] = sum16(part[g]);                 \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t h = 0; h < queries; h++) {                                                            \
            float *sh = scores + h * n, m = max_f32(sh, n), sum = 0.0f;                                    \
            for (int64_t j = 0; j < n; j++) {                                                              \
                float e = exp_nonpositive(sh[j] - m);                                                      \
                sh[j] = e;                                                                                 \
                sum += e;                                                                                  \
            }                                                                                              \
            float inv = 1.0f / sum;                                                                        \
            for (int64_t j = 0; j < n; j++) sh[j] *= inv;                                                  \
        }                                                                                                  \
        memset(acc, 0, sizeof(float) * (size_t)(queries * dim));                                           \
        for (int64_t j = 0; j < n; j++) {                                                                  \
            const T *vp = v + slots[j] * stride;                                                           \
            for (int64_t kh = 0; kh < kv_heads; kh++) {                                                    \
                float p[MAX_GROUP];                                                                        \
                for (int g = 0; g < G; g++) p[g] = scores[(kh * G + g) * n + j];                           \
                for (int64_t c = 0; c < chunks; c++) {                                                     \
                    f32x16 x = LOAD16(vp + kh * dim + c * LANES);                                          \
                    for (int g = 0; g < G; g++) {                                                          \
                        float *a = acc + (kh * G + g) * dim + c * LANES;                                   \
                        f32x16 sum = load16_f32(a) + p[g] * x;                                             \
                        memcpy(a, &sum, sizeof sum);                                                       \
                    }                                                                                      \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t i = 0; i < queries * dim; i++) o[i] = STORE(acc[i]);                                  \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
ATTEND_ROW(attend_row_f32, float, load16_f32, STORE_F32)
ATTEND_ROW(attend_row_bf16, uint16_t, load16_bf16, f32_to_bf16)

/* Decode attention straight from the paged pools: one query token per row, its keys and values read at the
 * slots the row lists, never gathered into a copy first.
 *
 * q:      rows x heads x dim, element (r, h, d) at q[r * q_row + h * q_head + d]
 * k, v:   the layer's slot-major pools [N, kv_heads, dim], contiguous
 * slots:  [rows, width] int64: row r's keys are at slots[r * width + j] for j < lengths[r]
 * out:    rows x heads x dim, element (r, h, d) at out[r * out_row + h * dim + d]
 * Query head h reads key/value head h / (heads / kv_heads) (grouped-query attention). Per row, two passes
 * over its slots: every query head's scores against every key (kept, [heads, n]), then after a float32
 * softmax the weighted sum of the values, dim 16 lanes at a time. Returns 0; -1 when dim is not a multiple
 * of 16 up to 256 or the group is over 8 query heads per key/value head (the caller checks supports_shape
 * first); -2 when scratch memory could not be had.
 */
#define DECODE_ATTENTION(NAME, T, LOAD, ATTEND)                                                           \
    int NAME(const T *q, const T *k, const T *v, const int64_t *slots, const int64_t *lengths,             \
             int64_t rows, int64_t width, int64_t heads, int64_t kv_heads, int64_t dim, int64_t q_row,     \
             int64_t q_head, float scale, T *out, int64_t out_row) {                                       \
        int64_t group = heads / kv_heads;                                                                  \
        if (dim % LANES || dim > LANES * MAX_CHUNKS || group < 1 || group > MAX_GROUP) return -1;         \
        size_t bytes = sizeof(float) * (size_t)(heads * (width + 2 * dim) + LANES);                       \
        float *scores = aligned_alloc(64, (bytes + 63) / 64 * 64);                                         \
        if (scores == NULL) return -2;                                                                     \
        float *qf = scores + heads * width; /* [heads, dim]: the row's queries, scaled */                  \
        float *acc = qf + heads * dim;      /* [heads, dim] */                                             \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            for (int64_t h = 0; h < heads; h++)                                                            \
                for (int64_t d = 0; d < dim; d++) qf[h * dim + d] = LOAD(q[r * q_row + h * q_head + d]) * scale; \
            const int64_t *row_slots = slots + r * width;                                                  \
            int64_t n = lengths[r];                                                                        \
            T *o = out + r * out_row;                                                                      \
            switch (group) { /* a constant G per case: the compiler unrolls each */                       \
            case 1: ATTEND(1, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            case 2: ATTEND(2, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            case 3: ATTEND(3, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            case 4: ATTEND(4, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            case 5: ATTEND(5, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            case 6: ATTEND(6, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            case 7: ATTEND(7, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;               \
            default: ATTEND(8, qf, k, v, row_slots, n, kv_heads, dim, scores, acc, o); break;              \
            }                                                                                              \
        }                                                                                                  \
        free(scores);                                                                                      \
        return 0;                                                                                          \
    }

DECODE_ATTENTION(decode_attention_f32, float, LOAD_F32, attend_row_f32)
DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16_to_f32, attend_row_bf16)


/* What this build's instructions allow (bits: 1 AVX-512, 2 AVX512-BF16, 4 AMX, 8 AVX-512 DQ, which the prefill
 * kernels' exponential needs). The Python side asks before
 * it uses a kernel: a compiler older than the CPU builds the stubs, which must not be called as kernels. */
int kernel_features(void) {
    int bits = 0;
#ifdef __AVX512F__
    bits |= 1;
#endif
#ifdef __AVX512BF16__
    bits |= 2;
#endif
#ifdef HAVE_AMX
    bits |= 4;
#endif
#ifdef HAVE_PREFILL_MATH
    bits |= 8;
#endif
    return bits;
}

#ifdef __AVX512BF16__
/* float32 rounded to bfloat16 and widened again: what a torch op on bfloat16 tensors hands the next one. */
static inline __m512 rounded16(__m512 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round16(x)), 16));
}

/* One head's rotary embedding, transformers' bfloat16 ops exactly: out = x * cos + rotate_half(x) * sin,
 * each product and the sum rounded to bfloat16 (so no fused multiply-add can form across them), with
 * rotate_half(x) = (-x2, x1) for the halves x1, x2. dim even; masked 16-lane steps over each half. */
static inline void rotate_bf16(const uint16_t *x, const uint16_t *c, const uint16_t *s, int64_t dim,
                               uint16_t *out) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i += 16) {
        __mmask16 keep = half - i >= 16 ? 0xffff : (__mmask16)((1u << (half - i)) - 1);
        __m512 x1 = widen16(keep, x + i), x2 = widen16(keep, x + half + i);
        __m512 minus_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(INT32_MIN)));
        __m512 lo = _mm512_add_ps(rounded16(_mm512_mul_ps(x1, widen16(keep, c + i))),
                                  rounded16(_mm512_mul_ps(minus_x2, widen16(keep, s + i))));
        __m512 hi = _mm512_add_ps(rounded16(_mm512_mul_ps(x2, widen16(keep, c + half + i))),
                                  rounded16(_mm512_mul_ps(x1, widen16(keep, s + half + i))));
        _mm256_mask_storeu_epi16(out + i, keep, round16(lo));
        _mm256_mask_storeu_epi16(out + half + i, keep, round16(hi));
    }
}

/* A step's q|k|v projection [T, (heads + 2 kv_heads) * dim] (row stride qkv_row): q rotated into q_out
 * [T, heads, dim] (contiguous), k rotated into key_pool and v copied into value_pool at slots[t] (the pools
 * [N, kv_heads, dim] contiguous). cos, sin: [T, dim] with row stride cs_row. What llama_stack.py's rotary
 * ops and the two index_copy_ calls did, in one pass with no intermediate tensors. Returns 0. */
int rope_cache_bf16(const uint16_t *qkv, int64_t rows, int64_t qkv_row, int64_t heads, int64_t kv_heads,
                    int64_t dim, const uint16_t *cos, const uint16_t *sin, int64_t cs_row, const int64_t *slots,
                    uint16_t *key_pool, uint16_t *value_pool, uint16_t *q_out) {
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *row = qkv + t * qkv_row, *c = cos + t * cs_row, *s = sin + t * cs_row;
        for (int64_t h = 0; h < heads; h++) rotate_bf16(row + h * dim, c, s, dim, q_out + (t * heads + h) * dim);
        uint16_t *key = key_pool + slots[t] * kv_heads * dim;
        for (int64_t h = 0; h < kv_heads; h++) rotate_bf16(row + (heads + h) * dim, c, s, dim, key + h * dim);
        memcpy(value_pool + slots[t] * kv_heads * dim, row + (heads + kv_heads) * dim,
               (size_t)(kv_heads * dim) * 2);
    }
    return 0;
}
#else
int rope_cache_bf16(const uint16_t *qkv, int64_t rows, int64_t qkv_row, int64_t heads, int64_t kv_heads,
                    int64_t dim, const uint16_t *cos, const uint16_t *sin, int64_t cs_row, const int64_t *slots,
                    uint16_t *key_pool, uint16_t *value_pool, uint16_t *q_out) {
    (void)qkv, (void)rows, (void)qkv_row, (void)heads, (void)kv_heads, (void)dim, (void)cos, (void)sin;
    (void)cs_row, (void)slots, (void)key_pool, (void)value_pool, (void)q_out;
    return -1;
}
#endif
