/* fp16 -> fp32 for the GGUF block kernels (q8_0_f32.c, q8_act.c). */
#ifndef PARALLAX_CPU_HALF_H
#define PARALLAX_CPU_HALF_H

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

#endif
