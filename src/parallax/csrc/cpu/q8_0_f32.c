/* GGUF Q8_0 weight matmul on the CPU: y (M, N) = x (M, K) @ W^T, x and y fp32, W kept in
 * llama.cpp's Q8_0 block format: each row is K/32 blocks of 34 bytes, an fp16 scale d then
 * 32 int8 q, weight = q * d. The blocks are read as they are (a bit over a quarter of fp32's
 * bytes) and dequantised in registers, never in memory.
 *
 * Same tiling as int8_f32.c: RN weight rows x up to RM rows of x, RM x RN vector
 * accumulators. Per block the RN scales are converted once; each widened weight vector is
 * multiplied by its row's scale (so the products are x * (q * d), the same dequantised
 * values as the torch twin ops/reference.py:q8_0_linear) and serves every row of x in the
 * tile. Blocks of RN weight rows are split over OpenMP threads. K must be a multiple of 32.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"

#define QK 32
#define BLOCK_BYTES 34

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

/* The block's fp16 scale as fp32 (F16C where built with it; IEEE half otherwise). */
static inline float block_scale(const uint8_t* blk) {
    uint16_t h;
    memcpy(&h, blk, 2);
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

typedef void (*q8_tile_fn)(const float* x, int K, const uint8_t* w, size_t row_bytes, float* y,
                           int N);

#define Q8_TILE(NN, MM)                                                                      \
static void q8_tile_##NN##x##MM(const float* x, int K, const uint8_t* w, size_t row_bytes,  \
                                float* y, int N) {                                           \
    vf acc[MM][NN];                                                                          \
    for (int m = 0; m < MM; m++)                                                             \
        for (int r = 0; r < NN; r++) acc[m][r] = vzero();                                    \
    for (int b = 0; b < K / QK; b++) {                                                       \
        const uint8_t* blk[NN];                                                              \
        float d[NN];                                                                         \
        for (int r = 0; r < NN; r++) {                                                       \
            blk[r] = w + (size_t)r * row_bytes + (size_t)b * BLOCK_BYTES;                   \
            d[r] = block_scale(blk[r]);                                                      \
        }                                                                                    \
        for (int j = 0; j < QK; j += PARALLAX_VW) {                                          \
            vf wv[NN];                                                                       \
            for (int r = 0; r < NN; r++)                                                     \
                wv[r] = load_i8((const int8_t*)blk[r] + 2 + j) * d[r];                       \
            for (int m = 0; m < MM; m++) {                                                   \
                vf xv = vload(x + (size_t)m * K + (size_t)b * QK + j);                       \
                for (int r = 0; r < NN; r++) acc[m][r] += xv * wv[r];                        \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int m = 0; m < MM; m++)                                                             \
        for (int r = 0; r < NN; r++) y[(size_t)m * N + r] = vsum(acc[m][r]);                 \
}

#if PARALLAX_VW == 16
#define RM4 4
#define RM2 8
Q8_TILE(4, 1) Q8_TILE(4, 2) Q8_TILE(4, 3) Q8_TILE(4, 4)
Q8_TILE(2, 1) Q8_TILE(2, 2) Q8_TILE(2, 3) Q8_TILE(2, 4)
Q8_TILE(2, 5) Q8_TILE(2, 6) Q8_TILE(2, 7) Q8_TILE(2, 8)
Q8_TILE(1, 1) Q8_TILE(1, 2) Q8_TILE(1, 3) Q8_TILE(1, 4)
Q8_TILE(1, 5) Q8_TILE(1, 6) Q8_TILE(1, 7) Q8_TILE(1, 8)
static const q8_tile_fn T4[] = {0, q8_tile_4x1, q8_tile_4x2, q8_tile_4x3, q8_tile_4x4};
static const q8_tile_fn T2[] = {0, q8_tile_2x1, q8_tile_2x2, q8_tile_2x3, q8_tile_2x4,
                                q8_tile_2x5, q8_tile_2x6, q8_tile_2x7, q8_tile_2x8};
static const q8_tile_fn T1[] = {0, q8_tile_1x1, q8_tile_1x2, q8_tile_1x3, q8_tile_1x4,
                                q8_tile_1x5, q8_tile_1x6, q8_tile_1x7, q8_tile_1x8};
#else
#define RM4 2
#define RM2 4
Q8_TILE(4, 1) Q8_TILE(4, 2)
Q8_TILE(2, 1) Q8_TILE(2, 2) Q8_TILE(2, 3) Q8_TILE(2, 4)
Q8_TILE(1, 1) Q8_TILE(1, 2) Q8_TILE(1, 3) Q8_TILE(1, 4)
static const q8_tile_fn T4[] = {0, q8_tile_4x1, q8_tile_4x2};
static const q8_tile_fn T2[] = {0, q8_tile_2x1, q8_tile_2x2, q8_tile_2x3, q8_tile_2x4};
static const q8_tile_fn T1[] = {0, q8_tile_1x1, q8_tile_1x2, q8_tile_1x3, q8_tile_1x4};
#endif

/* Rows [0, M) of x in groups of at most rm, times weight rows [n, n + width). */
static inline void q8_row_groups(const q8_tile_fn* tiles, int rm, const float* x,
                                 const uint8_t* w, size_t row_bytes, float* y, int M, int N,
                                 int K, int n) {
    for (int m0 = 0; m0 < M; m0 += rm) {
        int rows = M - m0 < rm ? M - m0 : rm;
        tiles[rows](x + (size_t)m0 * K, K, w + (size_t)n * row_bytes, row_bytes,
                    y + (size_t)m0 * N + n, N);
    }
}

/* w: N rows of K / 32 Q8_0 blocks (N * K / 32 * 34 bytes). */
void parallax_q8_0_linear_f32(const float* x, const uint8_t* w, float* y, int M, int N, int K,
                              int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    size_t row_bytes = (size_t)(K / QK) * BLOCK_BYTES;
    int rn = M <= RM4 ? 4 : 2, rm = M <= RM4 ? RM4 : RM2;
    const q8_tile_fn* wide = rn == 4 ? T4 : T2;
    int blocks = (N + rn - 1) / rn;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * rn;
        if (n0 + rn <= N)
            q8_row_groups(wide, rm, x, w, row_bytes, y, M, N, K, n0);
        else
            for (int n = n0; n < N; n++) q8_row_groups(T1, rm, x, w, row_bytes, y, M, N, K, n);
    }
}
