/* fp16 <-> fp32 for the GGUF block kernels (q8_0_f32.c, q8_act.c). */
#ifndef PARALLAX_CPU_HALF_H
#define PARALLAX_CPU_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"

/* The little-endian fp16 at p as fp32 (F16C where built with it; IEEE half otherwise). */
static inline float half_to_float(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {          /* zero or subnormal: man * 2^-24, exact in fp32 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* f rounded to the nearest fp16 value (ties to even; subnormals, overflow to inf), as fp32:
 * what storing f in a GGUF block's fp16 scale and reading it back gives (ggml's
 * GGML_FP32_TO_FP16, the same rounding as F16C's vcvtps2ph). */
static inline float round_to_half(float f) {
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(f, 0));   /* 0: round to nearest even */
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, a = x & 0x7fffffffu;
    uint16_t h;
    if (a >= 0x7f800000u) {                 /* inf, nan */
        h = (uint16_t)(sign | (a > 0x7f800000u ? 0x7e00 : 0x7c00));
    } else if (a >= 0x477ff000u) {          /* >= 65520: rounds past the largest half */
        h = (uint16_t)(sign | 0x7c00);
    } else if (a < 0x38800000u) {           /* below 2^-14: a multiple of 2^-24 */
        float m;
        memcpy(&m, &a, 4);
        h = (uint16_t)(sign | (uint32_t)rintf(m * 16777216.0f));   /* exact scaling */
    } else {                                /* normal: 23 -> 10 mantissa bits, ties even */
        uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);
        h = (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    uint8_t b[2];
    memcpy(b, &h, 2);
    return half_to_float(b);
#endif
}

#endif
