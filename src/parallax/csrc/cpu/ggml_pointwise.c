/* llama.cpp's CPU arithmetic, bit for bit, for the element-wise and row ops of a Llama layer
 * (PARALLAX_NUMERICS=ggml; the torch twins are in ops/ggml_reference.py):
 *   parallax_ggml_rms_norm_f32  RMS_NORM then MUL by the weight (norm-i -> attn_norm-i)
 *   parallax_ggml_rope_f32      ROPE (ggml_rope_ext, no YaRN, no frequency factors)
 *   parallax_ggml_swiglu_f32    SWIGLU (ggml_vec_swiglu_f32)
 * Each build matches the llama.cpp build of its instruction set (ggml-cpu, GCC 12, -O3 and
 * -ffp-contract=fast): avx512/avx512vnni the AVX-512 build, avx2/avxvnni the AVX2+FMA build,
 * generic ggml's x86-64 SSE2 build (no FMA). Where GCC contracted a*b+c in ggml's binary (its
 * disassembly decides) the fma is written out here (fmaf); everywhere else a product is kept
 * from being fused (unfused()), since this file is built with -ffp-contract=fast too.
 * Verified bit-equal, build against build, on every RMS_NORM+MUL, ROPE and SWIGLU node of
 * llama.cpp's recorded graph (SmolLM2-135M Q8_0, prefill and decode) and against ggml's own
 * ops on random shapes (head dims with leftover pairs, rows with scalar tails, exp's overflow
 * branches); tests/test_ggml_pointwise.py checks the builds against the twins.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"
#include "ggml_expf.h"

/* v, as a value the compiler cannot fuse into a following add (an empty asm the optimiser
 * cannot see through, v in a vector register): llama.cpp rounds these products separately. */
#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER "+x"
#elif defined(__aarch64__)
#define IN_REGISTER "+w"
#else
#define IN_REGISTER "+m"
#endif
static inline float unfused(float v) { __asm__("" : IN_REGISTER(v)); return v; }

/* ------------------------------------------------------------------------------ RMS_NORM */

/* ggml_compute_forward_rms_norm_f32: the squares in float, summed in double in order; mean
 * rounded to float; scale = 1 / sqrtf(mean + eps) in float; then ggml_vec_scale_f32 and the
 * MUL by w (both plain products, so any vector width gives the same bits; the fused
 * RMS_NORM+MUL of llama.cpp's graph computes the same x * scale * w). */
void parallax_ggml_rms_norm_f32(const float* x, const float* w, float* y, int M, int K,
                                float eps) {
    for (int m = 0; m < M; m++) {
        const float* xm = x + (size_t)m * K;
        float* ym = y + (size_t)m * K;
        double sum = 0.0;
        for (int i = 0; i < K; i++) sum += (double)(xm[i] * xm[i]);
        const float mean = (float)(sum / K);
        const float scale = 1.0f / sqrtf(mean + eps);
        for (int i = 0; i < K; i++) ym[i] = (xm[i] * scale) * w[i];
    }
}

/* ---------------------------------------------------------------------------------- ROPE */

/* How many leading pairs of a row ggml's vectorised rotate_pairs computes with fused
 * multiply-adds (vfmaddsub: full vectors, then one half vector); the rest (and all pairs of
 * the SSE2 build) go through separate products and vaddsubps. */
static int fused_pairs(int npairs) {
#if PARALLAX_VW == 16
    int n = npairs / 8 * 8;                       /* zmm: 8 pairs a vector */
    return npairs - n >= 4 ? n + 4 : n;           /* then one ymm of 4 */
#elif PARALLAX_VW == 8
    int n = npairs / 4 * 4;                       /* ymm: 4 pairs */
    return npairs - n >= 2 ? n + 2 : n;           /* then one xmm of 2 */
#else
    (void)npairs;
    return 0;
#endif
}

/* x (T, H, D) in place. ggml_rope_cache_init: theta = pos, times theta_scale per pair in
 * float (freq_scale 1, attn_factor 1, ext_factor 0: no further rounding), cos and sin from
 * libm (GCC makes the pair one sincosf call, here as in ggml). Pair j is (2j, 2j+1) (neox 0)
 * or (j, j + D/2) (neox 1) with the same arithmetic:
 *   fused pairs: x0' = fma(x0, c, -(x1 s)), x1' = fma(x0, s, x1 c)
 *   the others:  x0' = x0 c - x1 s,          x1' = x1 c + x0 s      (every product rounded)
 * (llama.cpp's own NEOX mode, a scalar loop in ggml, fuses every pair on FMA builds: the same
 * bits as neox 1 here whenever fused_pairs covers the row: D/2 a multiple of 4 (AVX-512) or
 * of 2 (AVX2), as every usual head dim is.) */
void parallax_ggml_rope_f32(float* x, const int32_t* pos, int T, int H, int D,
                            float freq_base, int neox) {
    const int npairs = D / 2;
    const int nf = fused_pairs(npairs);
    const float theta_scale = powf(freq_base, -2.0f / D);
    const int stride = neox ? 1 : 2, offset = neox ? npairs : 1;
    float cs[npairs], sn[npairs];
    for (int t = 0; t < T; t++) {
        float theta = (float)pos[t];
        for (int j = 0; j < npairs; j++) {
            cs[j] = cosf(theta);
            sn[j] = sinf(theta);
            theta *= theta_scale;
        }
        for (int h = 0; h < H; h++) {
            float* row = x + ((size_t)t * H + h) * D;
            for (int j = 0; j < npairs; j++) {
                float* a = row + (size_t)j * stride;
                const float x0 = a[0], x1 = a[offset], c = cs[j], s = sn[j];
                if (j < nf) {
                    a[0] = fmaf(x0, c, -(x1 * s));
                    a[offset] = fmaf(x0, s, x1 * c);
                } else {
                    a[0] = unfused(x0 * c) - unfused(x1 * s);
                    a[offset] = unfused(x1 * c) + unfused(x0 * s);
                }
            }
        }
    }
}

/* -------------------------------------------------------------------------------- SWIGLU */

/* ggml_silu_f32, the scalar tail of every build: x / (1 + expf(-x)). */
static inline float silu_scalar(float v) { return v / (1.0f + expf(-v)); }

/* ggml_v_silu: x / (1 + ggml_v_expf(0 - x)) (ggml_expf.h), one vector width per build. */
#if PARALLAX_VW == 16
static inline __m512 silu_vec(__m512 x) {
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                          v_expf(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
#define SWIGLU_VW 16
#define SWIGLU_VEC(y, x, g) \
    _mm512_storeu_ps(y, _mm512_mul_ps(silu_vec(_mm512_loadu_ps(x)), _mm512_loadu_ps(g)))

#elif PARALLAX_VW == 8
static inline __m256 silu_vec(__m256 x) {
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                          v_expf(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#define SWIGLU_VW 8
#define SWIGLU_VEC(y, x, g) \
    _mm256_storeu_ps(y, _mm256_mul_ps(silu_vec(_mm256_loadu_ps(x)), _mm256_loadu_ps(g)))

#else
/* ggml's SSE2 path without FMA (MADD128 = a product, then a sum), in GCC vector extensions
 * so that it builds anywhere; every product goes through unfused4. */
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));   /* bit patterns and masks */
static inline v4f unfused4(v4f v) { __asm__("" : IN_REGISTER(v)); return v; }
static inline v4f splat(float s) { v4f v = {s, s, s, s}; return v; }
static inline v4u splatu(uint32_t s) { v4u v = {s, s, s, s}; return v; }
static inline v4f madd(v4f a, v4f b, v4f c) { return unfused4(a * b) + c; }
static inline v4f nmadd(v4f a, v4f b, v4f c) { return c - unfused4(a * b); }
static inline v4f silu_vec(v4f x) {
    const v4f v = splat(0.0f) - x;
    const v4f r = splat(0x1.8p23f);
    const v4f z = madd(v, splat(0x1.715476p+0f), r);
    const v4f n = z - r;
    const v4f b = nmadd(n, splat(0x1.7f7d1cp-20f), nmadd(n, splat(0x1.62e4p-1f), v));
    const v4u e = (v4u)z << 23;
    const v4f k = (v4f)(e + (v4u)splat(1.0f));
    const v4f an = (v4f)((v4u)n & splatu(0x7fffffffu));
    const v4u c = (v4u)(an > splat(126.0f));
    const v4f u = unfused4(b * b);
    const v4f j = madd(madd(madd(splat(0x1.0e4020p-7f), b, splat(0x1.573e2ep-5f)), u,
                            madd(splat(0x1.555e66p-3f), b, splat(0x1.fffdb6p-2f))),
                       u, unfused4(splat(0x1.ffffecp-1f) * b));
    const v4u g = (v4u)(n <= splat(0.0f)) & splatu(0x82000000u);
    const v4f s1 = (v4f)(g + splatu(0x7f000000u));
    const v4f s2 = (v4f)(e - g);
    const v4u d = (v4u)(an > splat(192.0f));
    const v4u big = (v4u)unfused4(s1 * s1);
    const v4u mid = (v4u)unfused4(madd(s2, j, s2) * s1);
    const v4u low = (v4u)madd(k, j, k);
    const v4f ex = (v4f)((d & big) | (~d & ((c & mid) | (~c & low))));
    return x / (splat(1.0f) + ex);
}
#define SWIGLU_VW 4
#define SWIGLU_VEC(y, x, g) do {                                          \
        v4f xv_, gv_, yv_;                                                \
        memcpy(&xv_, x, 16); memcpy(&gv_, g, 16);                         \
        yv_ = unfused4(silu_vec(xv_)) * gv_;                              \
        memcpy(y, &yv_, 16);                                              \
    } while (0)
#endif

/* y (M, N) = silu(gate) * up, x (M, 2N) holding [gate | up] per row: vectors of SWIGLU_VW
 * through silu_vec, the row's last N % SWIGLU_VW values through ggml_silu_f32. */
void parallax_ggml_swiglu_f32(const float* x, float* y, int M, int N) {
    for (int m = 0; m < M; m++) {
        const float* g = x + (size_t)m * 2 * N;
        const float* u = g + N;
        float* ym = y + (size_t)m * N;
        int i = 0;
        for (; i + SWIGLU_VW <= N; i += SWIGLU_VW) SWIGLU_VEC(ym + i, g + i, u + i);
        for (; i < N; i++) ym[i] = silu_scalar(g[i]) * u[i];
    }
}
