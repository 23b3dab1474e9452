/* y (M, N) = x (M, K) @ W^T for fp32 on the CPU, with W packed in column panels of 64:
 *   wp[(n / 64) * K * 64 + k * 64 + n % 64] = W[n, k]
 * so each panel (a K x 64 block of W^T) is one contiguous stream, read once per call for
 * all M rows (decode: M = batch). A 4 x 64 tile of y is 16 AVX-512 accumulators (or
 * twice as many AVX2 halves) that stay in registers: per k, 4 panel loads and 4
 * broadcasts of x feed 16 fused multiply-adds. Panels are split over OpenMP threads;
 * linked against torch's own libgomp, so the thread pool is torch's.
 * Built just in time by parallax/ops/cpu.py with -O3 -march=native; the torch twin is
 * ops/reference.py:linear_packed.
 */
#include <stddef.h>

#define P 64
typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 load16(const float* p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }

/* MM rows of x times one 64-wide panel. */
#define TILE(MM)                                                                        \
static inline void tile_##MM(const float* x, const float* panel, float* y, int K,      \
                             int ldy) {                                                 \
    v16 acc[MM][4];                                                                     \
    for (int m = 0; m < MM; m++)                                                        \
        for (int b = 0; b < 4; b++) acc[m][b] = (v16){0};                               \
    const float* wp = panel;                                                            \
    for (int k = 0; k < K; k++, wp += P) {                                              \
        v16 w[4];                                                                       \
        for (int b = 0; b < 4; b++) w[b] = load16(wp + 16 * b);                         \
        for (int m = 0; m < MM; m++) {                                                  \
            v16 xv = (v16){0} + x[(size_t)m * K + k];                                   \
            for (int b = 0; b < 4; b++) acc[m][b] += xv * w[b];                         \
        }                                                                               \
    }                                                                                   \
    for (int m = 0; m < MM; m++)                                                        \
        for (int b = 0; b < 4; b++) store16(y + (size_t)m * ldy + 16 * b, acc[m][b]);   \
}
TILE(1)
TILE(2)
TILE(4)

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
            if (left >= 4) { tile_4(xm, panel, ym, K, N); m0 += 4; }
            else if (left >= 2) { tile_2(xm, panel, ym, K, N); m0 += 2; }
            else { tile_1(xm, panel, ym, K, N); m0 += 1; }
        }
    }
}
