/* Widening int8 weights to fp32 vectors, shared by int8_f32.c and q8_0_f32.c. */
#ifndef PARALLAX_CPU_WIDEN_H
#define PARALLAX_CPU_WIDEN_H

#include <stdint.h>

#include "isa.h"

/* VW int8 weights widened to fp32 (sign-extend, convert): intrinsics on x86, where GCC
 * scalarises __builtin_convertvector from int8; the vector extension elsewhere. */
#if PARALLAX_VW == 16
#include <immintrin.h>
static inline vf load_i8(const int8_t* p) {
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#elif PARALLAX_VW == 8
#include <immintrin.h>
static inline vf load_i8(const int8_t* p) {
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
#else
typedef int32_t vi32 __attribute__((vector_size(PARALLAX_VW * 4)));
static inline vf load_i8(const int8_t* p) {
    vi32 w;
    for (int i = 0; i < PARALLAX_VW; i++) w[i] = p[i];
    return __builtin_convertvector(w, vf);
}
#endif

#endif
