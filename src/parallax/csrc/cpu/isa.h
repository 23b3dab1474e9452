/* The vector type of one build of the CPU kernels, from the compiler's target flags.
 *
 * ops/cpu.py compiles every C file of csrc/cpu once per variant, e.g.
 *   avx512vnni  avx512's flags and -mavx512vnni                                  (16 lanes)
 *   avx512   -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c   (16 lanes)
 *   avxvnni  avx2's flags and -mavxvnni (256-bit vpdpbusd, VEX)                  (8 lanes)
 *   avx2     -mavx2 -mfma -mf16c                                              (8 lanes)
 *   generic  no target flags: SSE2 on x86-64, NEON on arm64                   (4 lanes)
 * and loads the variant the CPU supports; tests load each one the CPU can run. The VNNI
 * variants differ only in csrc/cpu/q8_act.c (the 8-bit dot products). Only GCC
 * vector extensions that GCC 9 and clang both accept are used here: element-wise arithmetic,
 * scalar-vector arithmetic (`v * s` broadcasts s; `0 + s` would cost an add, as 0 + -0 is +0),
 * subscripts, memcpy loads (no __builtin_shufflevector, GCC 12), and a few immintrin.h
 * intrinsics where GCC's code for the generic form is poor.
 */
#ifndef PARALLAX_CPU_ISA_H
#define PARALLAX_CPU_ISA_H

#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PARALLAX_VW 16
#if defined(__AVX512VNNI__)
#define PARALLAX_ISA "avx512vnni"
#else
#define PARALLAX_ISA "avx512"
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define PARALLAX_VW 8
#if defined(__AVXVNNI__)
#define PARALLAX_ISA "avxvnni"
#else
#define PARALLAX_ISA "avx2"
#endif
#else
#define PARALLAX_VW 4
#define PARALLAX_ISA "generic"
#endif

/* PARALLAX_VW float lanes; loads and stores go through memcpy, so any alignment is fine. */
typedef float vf __attribute__((vector_size(PARALLAX_VW * 4)));

static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vzero(void) { vf v = {0}; return v; }
/* Sum of the lanes (shuffles and adds on x86; the order of the adds differs by variant). */
#if PARALLAX_VW == 16
#include <immintrin.h>
static inline float vsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif PARALLAX_VW == 8
#include <immintrin.h>
static inline float vsum(vf v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
#else
static inline float vsum(vf v) {
    float t[PARALLAX_VW];
    memcpy(t, &v, sizeof t);
    for (int w = PARALLAX_VW / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}
#endif

#endif
