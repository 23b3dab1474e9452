/* The small fp32 ops of a CPU decode step, one call each instead of ~10 torch ops.
 *
 * At decode the matmuls stream the weights (csrc/cpu/gemm_f32.c); everything else in a
 * layer touches a few KB, so its cost is per-op dispatch, not arithmetic. These fuse what
 * the torch references do in many ops:
 *   parallax_add_rms_norm_f32        reference.add_rms_norm / rms_norm
 *   parallax_silu_and_mul_f32        reference.silu_and_mul
 *   parallax_decode_attention_kv_f32 reference.decode_attention_with_kvcache
 *                                    (rotary on q and the new k, cache write, attention)
 * Built with gemm_f32.c into one library by parallax/ops/cpu.py.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "isa.h"

#if defined(PARALLAX_MVEC) && !defined(__clang__)
/* glibc's libmvec has vector expf (what <math.h> declares only under -ffast-math): loops
 * over expf below then run a vector of lanes at a time. ops/cpu.py builds without it where
 * it does not link; clang has no simd attribute (scalar expf there). */
float expf(float) __attribute__((simd("notinbranch")));
#endif

#include "softmax.h"

/* One vector of partial sums, folded once at the end. */
static inline float dot(const float* a, const float* b, int n) {
    vf acc = vzero();
    int i = 0;
    for (; i + PARALLAX_VW <= n; i += PARALLAX_VW) acc += vload(a + i) * vload(b + i);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out = rms_norm(x + residual) * w, residual_out = x + residual (residual may be NULL:
 * plain rms_norm, residual_out unused). Rows of length D, M rows. */
void parallax_add_rms_norm_f32(const float* x, const float* residual, const float* w,
                               float* out, float* residual_out, int M, int D, float eps) {
    for (int m = 0; m < M; m++) {
        const float* xm = x + (size_t)m * D;
        const float* src = xm;
        if (residual) {
            const float* rm = residual + (size_t)m * D;
            float* ro = residual_out + (size_t)m * D;
            for (int i = 0; i < D; i++) ro[i] = xm[i] + rm[i];
            src = ro;
        }
        float r = 1.f / sqrtf(dot(src, src, D) / D + eps);
        float* om = out + (size_t)m * D;
        for (int i = 0; i < D; i++) om[i] = (src[i] * r) * w[i];
    }
}

/* out (M, N) = silu(x[:, :N]) * x[:, N:], x (M, 2N). */
void parallax_silu_and_mul_f32(const float* x, float* out, int M, int N) {
    for (int m = 0; m < M; m++) {
        const float* g = x + (size_t)m * 2 * N;
        const float* u = g + N;
        float* o = out + (size_t)m * N;
        #pragma omp simd
        for (int i = 0; i < N; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* HF rotate_half: pairs (i, i + D/2) rotate by angle i. */
static inline void rotate(const float* x, const float* cos, const float* sin, float* out,
                          int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        out[i] = a * cos[i] - b * sin[i];
        out[i + h] = b * cos[i] + a * sin[i];
    }
}

#define KEYS 128   /* keys scored per block of the online softmax */
#define MAX_D 256
#define MAX_G 16

/* acc (D) = acc * corr + sum_j p[j] * v[j], v rows D apart; D % 16 == 0. Blocks of 4
 * vectors (then 1) of dims stay in registers across the keys. */
#define VW PARALLAX_VW
static void pv(float* acc, float corr, const float* p, const float* v, int n, int D) {
    int i0 = 0;
    for (; i0 + 4 * VW <= D; i0 += 4 * VW) {
        vf a0 = vload(acc + i0) * corr, a1 = vload(acc + i0 + VW) * corr;
        vf a2 = vload(acc + i0 + 2 * VW) * corr, a3 = vload(acc + i0 + 3 * VW) * corr;
        for (int j = 0; j < n; j++) {
            const float* vj = v + (size_t)j * D + i0;
            a0 += p[j] * vload(vj);
            a1 += p[j] * vload(vj + VW);
            a2 += p[j] * vload(vj + 2 * VW);
            a3 += p[j] * vload(vj + 3 * VW);
        }
        vstore(acc + i0, a0);
        vstore(acc + i0 + VW, a1);
        vstore(acc + i0 + 2 * VW, a2);
        vstore(acc + i0 + 3 * VW, a3);
    }
    for (; i0 < D; i0 += VW) {
        vf a = vload(acc + i0) * corr;
        for (int j = 0; j < n; j++) a += p[j] * vload(v + (size_t)j * D + i0);
        vstore(acc + i0, a);
    }
}

/* One new token per sequence: rotate q and k, write k and v into cache slot
 * context_lens[b] - 1, then attend over slots [0, context_lens[b]).
 *   q (B, Hq, D) rows q_stride apart; k, v (B, Hk, D) rows k_stride / v_stride apart;
 *   cos, sin (B, D/2); caches (B, Hk, S, D) with strides (cache_b, cache_h, D, 1);
 *   out (B, Hq, D) contiguous. Query heads h*G .. h*G+G-1 share KV head h (G = Hq/Hk).
 *   D % 16 == 0, D <= MAX_D, G <= MAX_G (ops/cpu.py checks).
 * Returns 0, or 1 + the first sequence whose length is outside [1, S]: then nothing is
 * written (the lengths are checked before any cache write).
 * Work items are (sequence, KV head): each key and value row is read once for the G
 * queries that share it, keys in blocks with an online softmax.
 */
int parallax_decode_attention_kv_f32(
        const float* q, long q_stride, const float* k, long k_stride, const float* v,
        long v_stride, const float* cos, const float* sin, float* k_cache, float* v_cache,
        long cache_b, long cache_h, int S, const int32_t* context_lens, float* out, int B,
        int Hq, int Hk, int D, float scale, int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    for (int b = 0; b < B; b++)
        if (context_lens[b] < 1 || context_lens[b] > S) return b + 1;
    int G = Hq / Hk, h2 = D / 2;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int item = 0; item < B * Hk; item++) {
        int b = item / Hk, h = item % Hk;
        int len = context_lens[b];
        const float* cb = cos + (size_t)b * h2;
        const float* sb = sin + (size_t)b * h2;
        float* kc = k_cache + b * cache_b + h * cache_h;
        float* vc = v_cache + b * cache_b + h * cache_h;
        rotate(k + b * k_stride + (size_t)h * D, cb, sb, kc + (size_t)(len - 1) * D, D);
        const float* vn = v + b * v_stride + (size_t)h * D;
        for (int i = 0; i < D; i++) vc[(size_t)(len - 1) * D + i] = vn[i];

        float qr[MAX_G][MAX_D], acc[MAX_G][MAX_D], s[MAX_G][KEYS], mx[MAX_G], denom[MAX_G];
        for (int g = 0; g < G; g++) {
            rotate(q + b * q_stride + (size_t)(h * G + g) * D, cb, sb, qr[g], D);
            for (int i = 0; i < D; i++) acc[g][i] = 0.f;
            mx[g] = -INFINITY;
            denom[g] = 0.f;
        }
        for (int j0 = 0; j0 < len; j0 += KEYS) {
            int n = len - j0 < KEYS ? len - j0 : KEYS;
            const float* kb = kc + (size_t)j0 * D;
            for (int j = 0; j < n; j++)
                for (int g = 0; g < G; g++) s[g][j] = dot(qr[g], kb + (size_t)j * D, D) * scale;
            for (int g = 0; g < G; g++) {
                float corr = softmax_round(s[g], n, &mx[g], &denom[g]);
                pv(acc[g], corr, s[g], vc + (size_t)j0 * D, n, D);
            }
        }
        for (int g = 0; g < G; g++) {
            float* o = out + ((size_t)b * Hq + h * G + g) * D;
            float inv = 1.f / denom[g];
            for (int i = 0; i < D; i++) o[i] = acc[g][i] * inv;
        }
    }
    return 0;
}

/* out[m] = the first index of the largest value in row m of x (M, N), N >= 1, as
 * torch.argmax(x, -1): ties go to the first index, a NaN counts as the largest (its first
 * index wins). A greedy step reads R x vocab logits this way (R up to 64 x 49152 for
 * SmolLM2); torch's reduction walks them one element at a time (~0.8 ns each). Here one
 * vector pass per row keeps the chunk where the maximum first rose (or the first chunk
 * with a NaN), and only that chunk is scanned again; rows over the threads. */
#define ARGMAX_CHUNK 256
void parallax_argmax_rows_f32(const float* x, int64_t* out, int M, int N, int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 1)
    for (int m = 0; m < M; m++) {
        const float* r = x + (size_t)m * N;
        float mx = -INFINITY;
        int best = 0, nan = 0;
        for (int c = 0; c < N; c += ARGMAX_CHUNK) {
            int n = N - c < ARGMAX_CHUNK ? N - c : ARGMAX_CHUNK;
            float cm = -INFINITY;
            int cn = 0;
            #pragma omp simd reduction(max:cm) reduction(|:cn)
            for (int i = 0; i < n; i++) {
                cm = r[c + i] > cm ? r[c + i] : cm;
                cn |= r[c + i] != r[c + i];
            }
            if (cn) { best = c; nan = 1; break; }
            if (cm > mx) { mx = cm; best = c; }
        }
        int i = best;
        while (nan ? r[i] == r[i] : r[i] != mx) i++;   /* in chunk `best`, by construction */
        out[m] = i;
    }
}
