/* y (M, N) = x (M, K) @ W^T for fp32 on the CPU, with W packed in column panels of 32:
 *   wp[(n / 32) * K * 32 + k * 32 + n % 32] = W[n, k]
 * so each panel (a K x 32 block of W^T) is one contiguous stream. The layout is the same
 * for every instruction set; the register tile is not. ops/cpu.py builds this file once per
 * variant (see isa.h) and loads the one the CPU runs best:
 *   avx512   16-lane zmm, 32 registers: tiles of up to 8 rows x 32 columns (16 accumulators)
 *   avx2     8-lane ymm, 16 registers: up to 3 rows x 32 columns (12 accumulators); past
 *            64 rows (prefill), 6 x 16 tiles (12 accumulators, 2 weight vectors,
 *            1 broadcast) over the two halves of each panel
 *   generic  4-lane vectors (SSE2, NEON): 1 x 32; past 64 rows, 3 x 16
 * Per k a tile does NV panel loads and MM broadcasts of x feeding MM x NV fused
 * multiply-adds; every accumulator stays in a register (an 8 x 32 tile in ymm would need 32
 * of the 16 AVX2 registers and spill). When the rows do not fit one tile, K is cut in blocks
 * of KB so a block of the panel (KB x 32 floats, 16 KB) stays in L1 while every row group and
 * half reads it: the weight streams from memory once whatever M is. Panels are split over
 * OpenMP threads; linked against torch's own libgomp, so the thread pool is torch's.
 * The torch twin is ops/reference.py:linear_packed.
 */
#include <stddef.h>
#include <string.h>

#include "isa.h"

#define P 32     /* panel width, floats */
#define KB 128   /* k block when the rows take several tiles */

#if PARALLAX_VW == 16
#define NV_FULL 2
#define MR_FULL 8
#define MR_HALF 0   /* full tiles only: 8 x 32 is 16 of 32 registers */
#elif PARALLAX_VW == 8
#define NV_FULL 4
#define MR_FULL 3
#define MR_HALF 6
#else
#define NV_FULL 8
#define MR_FULL 1
#define MR_HALF 3
#endif
#define NV_HALF (NV_FULL / 2)
/* Half-panel tiles only for more rows than this (prefill): for decode batches, full-width
 * row groups read each panel block in order, which the prefetchers follow; half-panel passes
 * touch every other cache line and measured up to 1.9x slower on AVX2 (49152 x 576, 8 rows:
 * 17.6 against 9.4 ms, 1 thread), while at 128 rows the two tie. */
#ifndef HALF_ABOVE
#define HALF_ABOVE 64
#endif

typedef void (*tile_fn)(const float* x, int ldx, const float* w, int kn, float* y, int ldy,
                        int add);

/* MM rows of x times NV vectors of panel columns, over kn values of k. add: accumulate onto
 * y (a later k block), else overwrite it. */
#define TILE(MM, NV)                                                                      \
static void tile_##MM##x##NV(const float* x, int ldx, const float* w, int kn, float* y,  \
                             int ldy, int add) {                                          \
    vf acc[MM][NV];                                                                       \
    for (int m = 0; m < MM; m++)                                                          \
        for (int b = 0; b < NV; b++)                                                      \
            acc[m][b] = add ? vload(y + (size_t)m * ldy + PARALLAX_VW * b) : vzero();     \
    for (int k = 0; k < kn; k++, w += P) {                                                \
        vf wv[NV];                                                                        \
        for (int b = 0; b < NV; b++) wv[b] = vload(w + PARALLAX_VW * b);                  \
        for (int m = 0; m < MM; m++) {                                                    \
            float xs = x[(size_t)m * ldx + k];                                            \
            for (int b = 0; b < NV; b++) acc[m][b] += wv[b] * xs;                         \
        }                                                                                 \
    }                                                                                     \
    for (int m = 0; m < MM; m++)                                                          \
        for (int b = 0; b < NV; b++) vstore(y + (size_t)m * ldy + PARALLAX_VW * b, acc[m][b]); \
}

#if PARALLAX_VW == 16
TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2) TILE(7, 2) TILE(8, 2)
static const tile_fn FULL[] = {0, tile_1x2, tile_2x2, tile_3x2, tile_4x2, tile_5x2, tile_6x2,
                               tile_7x2, tile_8x2};
static const tile_fn HALF[] = {0};
#elif PARALLAX_VW == 8
TILE(1, 4) TILE(2, 4) TILE(3, 4)
TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2)
static const tile_fn FULL[] = {0, tile_1x4, tile_2x4, tile_3x4};
static const tile_fn HALF[] = {0, tile_1x2, tile_2x2, tile_3x2, tile_4x2, tile_5x2, tile_6x2};
#else
TILE(1, 8)
TILE(1, 4) TILE(2, 4) TILE(3, 4)
static const tile_fn FULL[] = {0, tile_1x8};
static const tile_fn HALF[] = {0, tile_1x4, tile_2x4, tile_3x4};
#endif

/* Rows [0, M) in groups of at most mr, each times columns [c0, c0 + width) of one panel
 * block. */
static inline void row_groups(const tile_fn* tiles, int mr, const float* x, const float* w,
                              float* y, int M, int K, int N, int kn, int add) {
    for (int m0 = 0; m0 < M; m0 += mr) {
        int rows = M - m0 < mr ? M - m0 : mr;
        tiles[rows](x + (size_t)m0 * K, K, w, kn, y + (size_t)m0 * N, N, add);
    }
}

void parallax_gemm_packed_f32(const float* x, const float* wp, float* y, int M, int N, int K,
                              int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    int panels = N / P;
    int half = MR_HALF > 0 && M > HALF_ABOVE;
    int kb = M <= MR_FULL ? K : KB;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int t = 0; t < panels; t++) {
        const float* panel = wp + (size_t)t * K * P;
        float* yt = y + (size_t)t * P;
        for (int k0 = 0; k0 < K; k0 += kb) {
            int kn = K - k0 < kb ? K - k0 : kb;
            const float* xk = x + k0;
            const float* wk = panel + (size_t)k0 * P;
            if (half) {
                row_groups(HALF, MR_HALF, xk, wk, yt, M, K, N, kn, k0 > 0);
                row_groups(HALF, MR_HALF, xk, wk + P / 2, yt + P / 2, M, K, N, kn, k0 > 0);
            } else {
                row_groups(FULL, MR_FULL, xk, wk, yt, M, K, N, kn, k0 > 0);
            }
        }
    }
}

/* Which variant this library is: "avx512", "avx2" or "generic" (ops.kernel_report). */
const char* parallax_cpu_isa(void) { return PARALLAX_ISA; }
