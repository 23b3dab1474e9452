/* y (M, N) = x (M, K) @ W^T for fp32 on the CPU, with W packed in column panels of 32:
 *   wp[(n / 32) * K * 32 + k * 32 + n % 32] = W[n, k]
 * so each panel (a K x 32 block of W^T) is one contiguous stream. An 8 x 32 tile of y is
 * 16 AVX-512 accumulators (or twice as many AVX2 halves) that stay in registers: per k,
 * 2 panel loads and 8 broadcasts of x feed 16 fused multiply-adds. Up to 8 rows (decode
 * batches) read each panel once, so the weight streams from memory at an even rate; with
 * 64-wide panels and 4-row tiles a batch of 8 read each panel twice, the second time from
 * cache with memory idle (2 threads, batch 8: 9.1 -> 6.7 ms over SmolLM2's layers).
 * Panels are split over OpenMP threads; linked against torch's own libgomp, so the thread
 * pool is torch's. Built just in time by parallax/ops/cpu.py with -O3 -march=native; the
 * torch twin is ops/reference.py:linear_packed.
 */
#include <stddef.h>

#define P 32
#define NV (P / 16)
typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 load16(const float* p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }

/* MM rows of x times one 32-wide panel. */
#define TILE(MM)                                                                        \
static inline void tile_##MM(const float* x, const float* panel, float* y, int K,      \
                             int ldy) {                                                 \
    v16 acc[MM][NV];                                                                    \
    for (int m = 0; m < MM; m++)                                                        \
        for (int b = 0; b < NV; b++) acc[m][b] = (v16){0};                              \
    const float* wp = panel;                                                            \
    for (int k = 0; k < K; k++, wp += P) {                                              \
        v16 w[NV];                                                                      \
        for (int b = 0; b < NV; b++) w[b] = load16(wp + 16 * b);                        \
        for (int m = 0; m < MM; m++) {                                                  \
            v16 xv = (v16){0} + x[(size_t)m * K + k];                                   \
            for (int b = 0; b < NV; b++) acc[m][b] += xv * w[b];                        \
        }                                                                               \
    }                                                                                   \
    for (int m = 0; m < MM; m++)                                                        \
        for (int b = 0; b < NV; b++) store16(y + (size_t)m * ldy + 16 * b, acc[m][b]);  \
}
TILE(1)
TILE(2)
TILE(4)
TILE(8)

void parallax_gemm_packed_f32(const float* x, const float* wp, float* y, int M, int N, int K,
                              int num_threads) {
    int panels = N / P;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int t = 0; t < panels; t++) {
        const float* panel = wp + (size_t)t * K * P;
        for (int m0 = 0; m0 < M;) {
            const float* xm = x + (size_t)m0 * K;
            float* ym = y + (size_t)m0 * N + (size_t)t * P;
            int left = M - m0;
            if (left >= 8) { tile_8(xm, panel, ym, K, N); m0 += 8; }
            else if (left >= 4) { tile_4(xm, panel, ym, K, N); m0 += 4; }
            else if (left >= 2) { tile_2(xm, panel, ym, K, N); m0 += 2; }
            else { tile_1(xm, panel, ym, K, N); m0 += 1; }
        }
    }
}
