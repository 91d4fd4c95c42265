/* What both kernel sources share (cpu_kernels.c, cpu_linears.c): bfloat16 widened from its 16 bits and
 * rounded to nearest even, as torch does. */
#ifndef PREFIX_SERVE_CPU_KERNELS_H
#define PREFIX_SERVE_CPU_KERNELS_H

#include <stdint.h>
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

#endif
