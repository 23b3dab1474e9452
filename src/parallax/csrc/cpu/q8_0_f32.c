/* GGUF Q8_0 / Q4_0 weight matmul on the CPU: y (M, N) = x (M, K) @ W^T, x and y fp32, W
 * kept in llama.cpp's block format, K/32 blocks per row:
 *   Q8_0: 34 bytes, an fp16 scale d then 32 int8 q; weight = q * d;
 *   Q4_0: 18 bytes, an fp16 scale d then 16 bytes of 4-bit q (element i < 16 in the low
 *         nibble of byte i, element 16 + i in its high nibble); weight = (q - 8) * d.
 * The blocks are read as they are and dequantised in registers, never in memory.
 *
 * Same tiling as int8_f32.c: RN weight rows x up to RM rows of x, RM x RN vector
 * accumulators. Per block the RN scales are converted once; each widened weight vector is
 * multiplied by its row's scale (so the products are x * (q * d), the same dequantised
 * values as the torch twin ops/reference.py:q8_0_linear) and serves every row of x in the
 * tile. With one row of x (a batch-1 decode step) nothing shares that multiply, so the
 * block's sum of x * q is taken first and scaled once, d * sum(x * q): one multiply per
 * block instead of one per vector (10-15% faster with AVX2 on SmolLM2's shapes), the same
 * sum up to fp32 rounding. Blocks of RN weight rows are split over OpenMP threads; each
 * tile prefetches the rows two tiles ahead (PF_TILES). K must be a multiple of 32.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "half.h"
#include "isa.h"
#include "widen.h"

#define QK 32
/* Prefetch distance in tiles. A tile reads its NN rows block by block: NN short streams
 * (612 bytes a row at K = 576) that end before the hardware prefetcher has locked on, so
 * weights read from memory came at latency speed (Q8_0 at 7.5 GB/s with AVX2). Each block
 * step prefetches its share of the rows PF_TILES tiles ahead (the rows are contiguous), so
 * the whole tile region is requested by the time it is reached: 3-5x faster batch-1 Q8_0
 * matmuls on SmolLM2's shapes (2 threads, weights not in cache). x86 and arm64 prefetches
 * do not fault, so reading past the last row is harmless. */
#define PF_TILES 2
#define q8_0_BYTES 34
#define q4_0_BYTES 18

/* VW weights of a Q8_0 / Q4_0 block from element j (a multiple of VW), as fp32 q (Q8_0) or
 * q - 8 (Q4_0); the caller multiplies by d. */
static inline vf q8_0_load(const uint8_t* blk, int j) { return load_i8((const int8_t*)blk + 2 + j); }

#if PARALLAX_VW == 16
static inline vf q4_0_load(const uint8_t* blk, int j) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)));
    if (j >= 16) b = _mm512_srli_epi32(b, 4);
    b = _mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), _mm512_set1_epi32(8));
    return (vf)_mm512_cvtepi32_ps(b);
}
#elif PARALLAX_VW == 8
static inline vf q4_0_load(const uint8_t* blk, int j) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + (j & 15))));
    if (j >= 16) b = _mm256_srli_epi32(b, 4);
    b = _mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), _mm256_set1_epi32(8));
    return (vf)_mm256_cvtepi32_ps(b);
}
#else
static inline vf q4_0_load(const uint8_t* blk, int j) {
    vi32 w;
    const uint8_t* p = blk + 2 + (j & 15);
    for (int i = 0; i < PARALLAX_VW; i++) w[i] = (j >= 16 ? p[i] >> 4 : p[i] & 15) - 8;
    return __builtin_convertvector(w, vf);
}
#endif

/* The block's fp16 scale as fp32. */
static inline float block_scale(const uint8_t* blk) { return half_to_float(blk); }

typedef void (*q_tile_fn)(const float* x, int K, const uint8_t* w, size_t row_bytes, float* y,
                          int N);

#define Q_TILE(FMT, NN, MM)                                                                  \
static void FMT##_tile_##NN##x##MM(const float* x, int K, const uint8_t* w, size_t row_bytes, \
                                   float* y, int N) {                                        \
    vf acc[MM][NN];                                                                          \
    for (int m = 0; m < MM; m++)                                                             \
        for (int r = 0; r < NN; r++) acc[m][r] = vzero();                                    \
    uintptr_t ahead = (uintptr_t)w + (uintptr_t)PF_TILES * NN * row_bytes;  /* may be past \
                                                     the end: an address, never dereferenced */ \
    for (int b = 0; b < K / QK; b++) {                                                       \
        for (int o = b * NN * FMT##_BYTES; o < (b + 1) * NN * FMT##_BYTES; o += 64)          \
            __builtin_prefetch((const void*)(ahead + (uintptr_t)o));                         \
        const uint8_t* blk[NN];                                                              \
        float d[NN];                                                                         \
        for (int r = 0; r < NN; r++) {                                                       \
            blk[r] = w + (size_t)r * row_bytes + (size_t)b * FMT##_BYTES;                   \
            d[r] = block_scale(blk[r]);                                                      \
        }                                                                                    \
        if (MM == 1) {              /* one row of x: scale the block's sum, not each q */   \
            vf bsum[NN];                                                                     \
            for (int r = 0; r < NN; r++) bsum[r] = vzero();                                  \
            for (int j = 0; j < QK; j += PARALLAX_VW) {                                      \
                vf xv = vload(x + (size_t)b * QK + j);                                       \
                for (int r = 0; r < NN; r++) bsum[r] += xv * FMT##_load(blk[r], j);          \
            }                                                                                \
            for (int r = 0; r < NN; r++) acc[0][r] += bsum[r] * d[r];                        \
            continue;                                                                        \
        }                                                                                    \
        for (int j = 0; j < QK; j += PARALLAX_VW) {                                          \
            vf wv[NN];                                                                       \
            for (int r = 0; r < NN; r++)                                                     \
                wv[r] = FMT##_load(blk[r], j) * d[r];                                        \
            for (int m = 0; m < MM; m++) {                                                   \
                vf xv = vload(x + (size_t)m * K + (size_t)b * QK + j);                       \
                for (int r = 0; r < NN; r++) acc[m][r] += xv * wv[r];                        \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int m = 0; m < MM; m++)                                                             \
        for (int r = 0; r < NN; r++) y[(size_t)m * N + r] = vsum(acc[m][r]);                 \
}

/* Tile tables per format: [rows of x] -> function, for 4, 2 and 1 weight rows. */
#if PARALLAX_VW == 16
#define RM4 4
#define RM2 8
#define Q_TILES(F)                                                                           \
Q_TILE(F, 4, 1) Q_TILE(F, 4, 2) Q_TILE(F, 4, 3) Q_TILE(F, 4, 4)                              \
Q_TILE(F, 2, 1) Q_TILE(F, 2, 2) Q_TILE(F, 2, 3) Q_TILE(F, 2, 4)                              \
Q_TILE(F, 2, 5) Q_TILE(F, 2, 6) Q_TILE(F, 2, 7) Q_TILE(F, 2, 8)                              \
Q_TILE(F, 1, 1) Q_TILE(F, 1, 2) Q_TILE(F, 1, 3) Q_TILE(F, 1, 4)                              \
Q_TILE(F, 1, 5) Q_TILE(F, 1, 6) Q_TILE(F, 1, 7) Q_TILE(F, 1, 8)                              \
static const q_tile_fn F##_T4[] = {0, F##_tile_4x1, F##_tile_4x2, F##_tile_4x3, F##_tile_4x4}; \
static const q_tile_fn F##_T2[] = {0, F##_tile_2x1, F##_tile_2x2, F##_tile_2x3, F##_tile_2x4, \
                                   F##_tile_2x5, F##_tile_2x6, F##_tile_2x7, F##_tile_2x8};  \
static const q_tile_fn F##_T1[] = {0, F##_tile_1x1, F##_tile_1x2, F##_tile_1x3, F##_tile_1x4, \
                                   F##_tile_1x5, F##_tile_1x6, F##_tile_1x7, F##_tile_1x8};
#else
#define RM4 2
#define RM2 4
#define Q_TILES(F)                                                                           \
Q_TILE(F, 4, 1) Q_TILE(F, 4, 2)                                                              \
Q_TILE(F, 2, 1) Q_TILE(F, 2, 2) Q_TILE(F, 2, 3) Q_TILE(F, 2, 4)                              \
Q_TILE(F, 1, 1) Q_TILE(F, 1, 2) Q_TILE(F, 1, 3) Q_TILE(F, 1, 4)                              \
static const q_tile_fn F##_T4[] = {0, F##_tile_4x1, F##_tile_4x2};                           \
static const q_tile_fn F##_T2[] = {0, F##_tile_2x1, F##_tile_2x2, F##_tile_2x3, F##_tile_2x4}; \
static const q_tile_fn F##_T1[] = {0, F##_tile_1x1, F##_tile_1x2, F##_tile_1x3, F##_tile_1x4};
#endif
Q_TILES(q8_0)
Q_TILES(q4_0)

/* Rows [0, M) of x in groups of at most rm, times weight rows [n, n + width). */
static inline void q_row_groups(const q_tile_fn* tiles, int rm, const float* x,
                                const uint8_t* w, size_t row_bytes, float* y, int M, int N,
                                int K, int n) {
    for (int m0 = 0; m0 < M; m0 += rm) {
        int rows = M - m0 < rm ? M - m0 : rm;
        tiles[rows](x + (size_t)m0 * K, K, w + (size_t)n * row_bytes, row_bytes,
                    y + (size_t)m0 * N + n, N);
    }
}

static void q_linear(const q_tile_fn* t4, const q_tile_fn* t2, const q_tile_fn* t1,
                     size_t block_bytes, const float* x, const uint8_t* w, float* y, int M,
                     int N, int K, int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    size_t row_bytes = (size_t)(K / QK) * block_bytes;
    int rn = M <= RM4 ? 4 : 2, rm = M <= RM4 ? RM4 : RM2;
    const q_tile_fn* wide = rn == 4 ? t4 : t2;
    int blocks = (N + rn - 1) / rn;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * rn;
        if (n0 + rn <= N)
            q_row_groups(wide, rm, x, w, row_bytes, y, M, N, K, n0);
        else
            for (int n = n0; n < N; n++) q_row_groups(t1, rm, x, w, row_bytes, y, M, N, K, n);
    }
}

/* w: N rows of K / 32 Q8_0 blocks (N * K / 32 * 34 bytes). */
void parallax_q8_0_linear_f32(const float* x, const uint8_t* w, float* y, int M, int N, int K,
                              int num_threads) {
    q_linear(q8_0_T4, q8_0_T2, q8_0_T1, q8_0_BYTES, x, w, y, M, N, K, num_threads);
}

/* w: N rows of K / 32 Q4_0 blocks (N * K / 32 * 18 bytes). */
void parallax_q4_0_linear_f32(const float* x, const uint8_t* w, float* y, int M, int N, int K,
                              int num_threads) {
    q_linear(q4_0_T4, q4_0_T2, q4_0_T1, q4_0_BYTES, x, w, y, M, N, K, num_threads);
}
