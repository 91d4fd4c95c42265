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

/* e^x for x <= 0 (softmax's shifted scores): 2^(x log2 e) as 2^n * 2^f, f in [-0.5, 0.5], with Cephes'
 * exp2f polynomial (relative error about 2e-7). Branch-free, so the loops calling it vectorise. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float n = floorf(t + 0.5f);
    float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t e = (int32_t)n + 127;
    uint32_t bits = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

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
            float *sh = scores + h * n, m = -INFINITY, sum = 0.0f;                                         \
            for (int64_t j = 0; j < n; j++) m = sh[j] > m ? sh[j] : m;                                     \
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
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

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* A 16 x 16 float32 tile plus bias, rounded (nearest even) into rows m0.. of y, outputs n0..; the rows
 * past `rows` (x's zero padding) and outputs past `out_features` are not written. */
static inline void store_tile(const float *acc, const uint16_t *bias, int64_t n0, int64_t out_features,
                              int64_t m0, int64_t rows, uint16_t *y, int64_t y_row) {
    int64_t left = out_features - n0;
    __mmask16 keep = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    __m512 b = _mm512_setzero_ps();
    if (bias)
        b = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias + n0)), 16));
    for (int r = 0; r < 16 && m0 + r < rows; r++) {
        __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(acc + r * 16), b));
        _mm256_mask_storeu_epi16(y + (m0 + r) * y_row + n0, keep, (__m256i)v);
    }
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
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.bytes_per_row[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg); /* per call: oneDNN configures the tiles its own way between our calls */
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
