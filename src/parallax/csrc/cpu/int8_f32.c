/* Weight-only int8 matmul on the CPU: y (M, N) = x (M, K) @ (q (N, K) * s[:, None])^T,
 * x and y fp32, q int8 row-major as reference.quantize_int8 makes it, s (N,) fp32 per output
 * channel. The weight is read as int8 (a quarter of fp32's bytes) and widened to fp32 in
 * registers, never dequantised in memory.
 *
 * A tile is RN weight rows x up to RM rows of x: RM x RN vector accumulators of partial dot
 * products along k, folded once at the end and scaled by s. Per vector of k it widens RN
 * weight vectors and loads RM of x. Few rows of x: RN = 4 (four weight streams), RM = 4 on
 * AVX-512 (16 of 32 registers), 2 elsewhere (8 of 16); more rows: RN = 2 and RM = 8 (16
 * accumulators) or 4 (8), so each widened weight vector serves more rows. Rows of x past RM
 * loop over the same weight rows, which stay in L1, so the weight streams from memory once
 * whatever M is. Blocks of RN rows are split over OpenMP threads. The torch twin is
 * ops/reference.py:int8_linear.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"

#include "widen.h"

/* Prefetch distance in tiles: a tile's NN rows are short streams (K bytes each) that end
 * before the hardware prefetcher locks on; each k step requests its share of the rows
 * PF_TILES tiles ahead (contiguous), as q8_0_f32.c does. */
#define PF_TILES 2

typedef void (*int8_tile_fn)(const float* x, int K, const int8_t* q, const float* s, float* y,
                             int N);

#define INT8_TILE(NN, MM)                                                                    \
static void int8_tile_##NN##x##MM(const float* x, int K, const int8_t* q, const float* s,  \
                                  float* y, int N) {                                         \
    vf acc[MM][NN];                                                                          \
    for (int m = 0; m < MM; m++)                                                             \
        for (int r = 0; r < NN; r++) acc[m][r] = vzero();                                    \
    uintptr_t ahead = (uintptr_t)q + (uintptr_t)PF_TILES * NN * K;  /* may be past the end: \
                                                    an address, never dereferenced */       \
    int k = 0;                                                                               \
    for (; k + PARALLAX_VW <= K; k += PARALLAX_VW) {                                         \
        for (int o = (k * NN + 63) & ~63; o < (k + PARALLAX_VW) * NN; o += 64)               \
            __builtin_prefetch((const void*)(ahead + (uintptr_t)o));                         \
        vf w[NN];                                                                            \
        for (int r = 0; r < NN; r++) w[r] = load_i8(q + (size_t)r * K + k);                  \
        for (int m = 0; m < MM; m++) {                                                       \
            vf xv = vload(x + (size_t)m * K + k);                                            \
            for (int r = 0; r < NN; r++) acc[m][r] += xv * w[r];                             \
        }                                                                                    \
    }                                                                                        \
    for (int m = 0; m < MM; m++)                                                             \
        for (int r = 0; r < NN; r++) {                                                       \
            float t = vsum(acc[m][r]);                                                       \
            for (int kk = k; kk < K; kk++) t += x[(size_t)m * K + kk] * q[(size_t)r * K + kk]; \
            y[(size_t)m * N + r] = t * s[r];                                                 \
        }                                                                                    \
}

/* Tile tables: [rows of x] -> function, for 4, 2 and 1 weight rows. Few rows of x take 4
 * weight rows (more streams, more independent sums); more rows take 2 weight rows so that
 * each widened weight vector serves up to RM2 rows of x. */
#if PARALLAX_VW == 16
#define RM4 4
#define RM2 8
INT8_TILE(4, 1) INT8_TILE(4, 2) INT8_TILE(4, 3) INT8_TILE(4, 4)
INT8_TILE(2, 1) INT8_TILE(2, 2) INT8_TILE(2, 3) INT8_TILE(2, 4)
INT8_TILE(2, 5) INT8_TILE(2, 6) INT8_TILE(2, 7) INT8_TILE(2, 8)
INT8_TILE(1, 1) INT8_TILE(1, 2) INT8_TILE(1, 3) INT8_TILE(1, 4)
INT8_TILE(1, 5) INT8_TILE(1, 6) INT8_TILE(1, 7) INT8_TILE(1, 8)
static const int8_tile_fn T4[] = {0, int8_tile_4x1, int8_tile_4x2, int8_tile_4x3, int8_tile_4x4};
static const int8_tile_fn T2[] = {0, int8_tile_2x1, int8_tile_2x2, int8_tile_2x3, int8_tile_2x4,
                                  int8_tile_2x5, int8_tile_2x6, int8_tile_2x7, int8_tile_2x8};
static const int8_tile_fn T1[] = {0, int8_tile_1x1, int8_tile_1x2, int8_tile_1x3, int8_tile_1x4,
                                  int8_tile_1x5, int8_tile_1x6, int8_tile_1x7, int8_tile_1x8};
#else
#define RM4 2
#define RM2 4
INT8_TILE(4, 1) INT8_TILE(4, 2)
INT8_TILE(2, 1) INT8_TILE(2, 2) INT8_TILE(2, 3) INT8_TILE(2, 4)
INT8_TILE(1, 1) INT8_TILE(1, 2) INT8_TILE(1, 3) INT8_TILE(1, 4)
static const int8_tile_fn T4[] = {0, int8_tile_4x1, int8_tile_4x2};
static const int8_tile_fn T2[] = {0, int8_tile_2x1, int8_tile_2x2, int8_tile_2x3, int8_tile_2x4};
static const int8_tile_fn T1[] = {0, int8_tile_1x1, int8_tile_1x2, int8_tile_1x3, int8_tile_1x4};
#endif

/* Rows [0, M) of x in groups of at most rm, times weight rows [n, n + width). */
static inline void row_groups(const int8_tile_fn* tiles, int rm, const float* x, const int8_t* q,
                              const float* s, float* y, int M, int N, int K, int n) {
    for (int m0 = 0; m0 < M; m0 += rm) {
        int rows = M - m0 < rm ? M - m0 : rm;
        tiles[rows](x + (size_t)m0 * K, K, q + (size_t)n * K, s + n, y + (size_t)m0 * N + n, N);
    }
}

void parallax_int8_linear_f32(const float* x, const int8_t* q, const float* s, float* y, int M,
                              int N, int K, int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    int rn = M <= RM4 ? 4 : 2, rm = M <= RM4 ? RM4 : RM2;
    const int8_tile_fn* wide = rn == 4 ? T4 : T2;
    int blocks = (N + rn - 1) / rn;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * rn;
        if (n0 + rn <= N)
            row_groups(wide, rm, x, q, s, y, M, N, K, n0);
        else
            for (int n = n0; n < N; n++) row_groups(T1, rm, x, q, s, y, M, N, K, n);
    }
}
