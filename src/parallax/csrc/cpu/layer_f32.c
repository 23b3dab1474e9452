/* The two halves of a Llama decoder layer, each one call of the existing kernels in a row
 * (fp32 activations, CPU): no kernel code of its own, only the order and the buffers, so a
 * step pays one op dispatch per half instead of ~8 Python-level ops, splits and checks.
 *
 *   attention half:  residual_out = x + residual;  h = rms_norm(residual_out) * norm_w
 *                    qkv = h @ W_qkv^T (+ b_qkv);  a = paged attention (rotary, cache write)
 *                    out = a @ W_o^T                (row-parallel: the caller all-reduces)
 *   MLP half:        residual_out = x + residual;  h = rms_norm(residual_out) * norm_w
 *                    gu = h @ W_gate_up^T;  out = silu(gu[:, :F]) * gu[:, F:] @ W_down^T
 *
 * residual NULL (the first layer): residual_out = x. The matmuls take any weight kind with a
 * kernel here (LINEAR_* below: packed fp32 panels, GGUF blocks with fp32 or 8-bit
 * activations); ops/cpu.py decides per weight and row count that the kernel is the path.
 * The torch twins are reference.fused_attention_half / fused_mlp_half.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The entry points of the other files of this library. */
void parallax_add_rms_norm_f32(const float* x, const float* residual, const float* w,
                               float* out, float* residual_out, int M, int D, float eps);
void parallax_silu_and_mul_f32(const float* x, float* out, int M, int N);
void parallax_gemm_packed_f32(const float* x, const float* wp, float* y, int M, int N, int K,
                              int num_threads);
void parallax_q8_0_linear_f32(const float* x, const uint8_t* w, float* y, int M, int N, int K,
                              int num_threads);
void parallax_q4_0_linear_f32(const float* x, const uint8_t* w, float* y, int M, int N, int K,
                              int num_threads);
int parallax_q8_0_linear_q8(const float*, const uint8_t*, float*, int, int, int, int);
int parallax_q4_0_linear_q8(const float*, const uint8_t*, float*, int, int, int, int);
int parallax_q4_1_linear_q8(const float*, const uint8_t*, float*, int, int, int, int);
int parallax_q4_k_linear_q8(const float*, const uint8_t*, float*, int, int, int, int);
int parallax_q6_k_linear_q8(const float*, const uint8_t*, float*, int, int, int, int);
int parallax_paged_attention_kv_f32(
        const float* q, long q_stride, const float* k, long k_stride, const float* v,
        long v_stride, const float* cos, const float* sin, float* k_cache, float* v_cache,
        const int64_t* slot_mapping, const int32_t* block_tables, int max_blocks,
        const int32_t* context_lens, const int32_t* qsl, float* out, int T, int B, int Hq,
        int Hk, int D, int N, int bs, float scale, int window, float softcap, int num_threads);

/* Weight kinds, as torch_ops.cpp numbers them (names as ops/cpu.py's choose()). */
enum { LINEAR_F32 = 0, LINEAR_Q8_0 = 1, LINEAR_Q4_0 = 2, LINEAR_Q8_0_Q8 = 3,
       LINEAR_Q4_0_Q8 = 4, LINEAR_Q4_1_Q8 = 5, LINEAR_Q4_K_Q8 = 6, LINEAR_Q6_K_Q8 = 7 };
enum { OUT_OF_MEMORY = -100, BAD_KIND = -101 };

/* y (M, N) = x (M, K) @ W^T; 0, OUT_OF_MEMORY (8-bit activation codes) or BAD_KIND. */
static int linear(int kind, const float* x, const void* w, float* y, int M, int N, int K,
                  int threads) {
    int rc = 0;
    switch (kind) {
    case LINEAR_F32: parallax_gemm_packed_f32(x, w, y, M, N, K, threads); break;
    case LINEAR_Q8_0: parallax_q8_0_linear_f32(x, w, y, M, N, K, threads); break;
    case LINEAR_Q4_0: parallax_q4_0_linear_f32(x, w, y, M, N, K, threads); break;
    case LINEAR_Q8_0_Q8: rc = parallax_q8_0_linear_q8(x, w, y, M, N, K, threads); break;
    case LINEAR_Q4_0_Q8: rc = parallax_q4_0_linear_q8(x, w, y, M, N, K, threads); break;
    case LINEAR_Q4_1_Q8: rc = parallax_q4_1_linear_q8(x, w, y, M, N, K, threads); break;
    case LINEAR_Q4_K_Q8: rc = parallax_q4_k_linear_q8(x, w, y, M, N, K, threads); break;
    case LINEAR_Q6_K_Q8: rc = parallax_q6_k_linear_q8(x, w, y, M, N, K, threads); break;
    default: return BAD_KIND;
    }
    return rc ? OUT_OF_MEMORY : 0;
}

/* Rows per thread below which the row-wise ops run on the calling thread: a parallel
 * region costs a fork and a barrier (a few us), a norm row ~0.1 us, a SiLU row ~1 us. */
#define NORM_ROWS_PER_THREAD 16
#define SILU_ROWS_PER_THREAD 2

/* The row-wise ops between the matmuls, over the threads by rows when there are enough:
 * each row is computed exactly as on one thread (same order within the row), so the
 * result does not depend on the thread count. On one thread the other team thread would
 * otherwise wait at the next matmul's fork for all of it (prefill chunks: ~5% of a step). */
static void norm_in(const float* x, const float* residual, const float* norm_w, float eps,
                    float* h, float* residual_out, int T, int H, int threads) {
    (void)threads;   /* unused when built without OpenMP */
    #pragma omp parallel for schedule(static) num_threads(threads) \
        if (threads > 1 && T >= 2 * NORM_ROWS_PER_THREAD)
    for (int t = 0; t < T; t++) {
        size_t o = (size_t)t * H;
        parallax_add_rms_norm_f32(x + o, residual ? residual + o : NULL, norm_w, h + o,
                                  residual_out + o, 1, H, eps);
        if (!residual) memcpy(residual_out + o, x + o, sizeof(float) * (size_t)H);
    }
}

static void silu_and_mul(const float* gate_up, float* act, int T, int F, int threads) {
    (void)threads;
    #pragma omp parallel for schedule(static) num_threads(threads) \
        if (threads > 1 && T >= 2 * SILU_ROWS_PER_THREAD)
    for (int t = 0; t < T; t++)
        parallax_silu_and_mul_f32(gate_up + (size_t)t * 2 * F, act + (size_t)t * F, 1, F);
}

/* x, residual (T, H); qkv scratch (T, (Hq + 2 Hk) D); attn scratch (T, Hq D); h scratch and
 * out, residual_out (T, H). Returns 0 or the paged kernel's code (nothing written to the
 * cache then), OUT_OF_MEMORY or BAD_KIND. */
int parallax_attention_half_f32(
        const float* x, const float* residual, const float* norm_w, float eps,
        int qkv_kind, const void* w_qkv, const float* b_qkv, int o_kind, const void* w_o,
        float* k_cache, float* v_cache, const float* cos, const float* sin,
        const int64_t* slot_mapping, const int32_t* block_tables, int max_blocks,
        const int32_t* context_lens, const int32_t* qsl, float* h, float* qkv, float* attn,
        float* out, float* residual_out, int T, int B, int H, int Hq, int Hk, int D, int N,
        int bs, float scale, int window, float softcap, int threads) {
    int n_qkv = (Hq + 2 * Hk) * D;
    norm_in(x, residual, norm_w, eps, h, residual_out, T, H, threads);
    int rc = linear(qkv_kind, h, w_qkv, qkv, T, n_qkv, H, threads);
    if (rc) return rc;
    if (b_qkv)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < n_qkv; i++) qkv[(size_t)t * n_qkv + i] += b_qkv[i];
    rc = parallax_paged_attention_kv_f32(
        qkv, n_qkv, qkv + (size_t)Hq * D, n_qkv, qkv + (size_t)(Hq + Hk) * D, n_qkv, cos, sin,
        k_cache, v_cache, slot_mapping, block_tables, max_blocks, context_lens, qsl, attn, T, B,
        Hq, Hk, D, N, bs, scale, window, softcap, threads);
    if (rc) return rc;
    return linear(o_kind, attn, w_o, out, T, H, Hq * D, threads);
}

/* x, residual (T, H); gate_up scratch (T, 2F); act scratch (T, F); h scratch and out,
 * residual_out (T, H). Returns 0, OUT_OF_MEMORY or BAD_KIND. */
int parallax_mlp_half_f32(
        const float* x, const float* residual, const float* norm_w, float eps, int gu_kind,
        const void* w_gate_up, int down_kind, const void* w_down, float* h, float* gate_up,
        float* act, float* out, float* residual_out, int T, int H, int F, int threads) {
    norm_in(x, residual, norm_w, eps, h, residual_out, T, H, threads);
    int rc = linear(gu_kind, h, w_gate_up, gate_up, T, 2 * F, H, threads);
    if (rc) return rc;
    silu_and_mul(gate_up, act, T, F, threads);
    return linear(down_kind, act, w_down, out, T, H, F, threads);
}
