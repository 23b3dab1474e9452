// C launchers of parallax's CUDA kernels.
//
// The .cu files implement these with nothing but the CUDA runtime; binding.cpp calls them
// from torch. Every launcher takes raw device pointers, sizes, element strides and the stream
// to run on, launches asynchronously, and returns the launch's cudaError_t as an int
// (0 = success) so that callers need no CUDA header to check it.
//
// dtype codes: 0 = float16, 1 = bfloat16, 2 = float32 (paged attention only). All arithmetic
// accumulates in float32.
#pragma once

#include <stdint.h>

// The same typedef cuda_runtime_api.h makes; repeating an identical typedef is legal C++, so
// this header works with or without the CUDA headers in front of it.
typedef struct CUstream_st* cudaStream_t;

#ifdef __cplusplus
extern "C" {
#endif

enum { PARALLAX_F16 = 0, PARALLAX_BF16 = 1, PARALLAX_F32 = 2 };

// Human-readable text of a code returned by a launcher.
const char* parallax_error_string(int code);

// Number of multiprocessors of `device` (cached after the first query); 0 on error.
int parallax_num_sms(int device);

// out = rms_norm(x + residual) and residual_out = x + residual (rounded to the dtype), rows of
// length d. residual may be null: then plain rms_norm(x) and residual_out is not written.
// x, residual, residual_out, out: (rows, d) contiguous; weight: (d,) same dtype.
int parallax_add_rms_norm(void* out, void* residual_out, const void* x, const void* residual,
                          const void* weight, int64_t rows, int64_t d, float eps, int dtype,
                          cudaStream_t stream);

// In-place rotary embedding, HF rotate_half layout (pairs (i, i + D/2)).
// q: (B, T, Hq, D) with element strides (q_sb, q_st, q_sh, 1); k likewise with Hk heads.
// cos, sin: (B, T, D/2) float32 contiguous.
int parallax_rotary_embedding(void* q, void* k, const float* cos, const float* sin, int64_t B,
                              int64_t T, int64_t Hq, int64_t Hk, int64_t D, int64_t q_sb,
                              int64_t q_st, int64_t q_sh, int64_t k_sb, int64_t k_st,
                              int64_t k_sh, int dtype, cudaStream_t stream);

// Flash-decoding: one query token per sequence against a (B, Hk, S, D) cache.
// q, out: (B, Hq, D) contiguous. k/v cache: element strides (sb, sh) for batch and head, the
// (S, D) part contiguous. context_lens: (B,) int32 on the device. D in {64, 128}.
// num_splits > 1 needs the float32 workspaces part_out (B, Hq, num_splits, D) and
// part_lse (B, Hq, num_splits); with num_splits == 1 they may be null.
int parallax_decode_attention(void* out, const void* q, const void* k_cache,
                              const void* v_cache, const int* context_lens, float* part_out,
                              float* part_lse, int64_t B, int64_t Hq, int64_t Hk, int64_t S,
                              int64_t D, int64_t k_sb, int64_t k_sh, int64_t v_sb, int64_t v_sh,
                              float scale, int num_splits, int dtype, cudaStream_t stream);

// How many KV splits decode attention should use for this problem on `device`.
int parallax_decode_num_splits(int64_t B, int64_t Hq, int64_t Hk, int64_t S, int device);

// Paged attention of a flat batch of mixed prefill and decode tokens with rotary and the
// cache write folded in: the twin of reference.paged_attention_with_kvcache (and of the CPU
// kernel csrc/cpu/paged_attention_f32.c). paged_attention.cu documents the algorithm.
typedef struct {
  void* out;                        // (T, Hq, D) contiguous, written
  const void* q;                    // (T, Hq, D) not yet rotated, strides (q_st, q_sh, 1)
  const void* k;                    // (T, Hk, D) new keys, not yet rotated, (k_st, k_sh, 1)
  const void* v;                    // (T, Hk, D) new values, (v_st, v_sh, 1)
  void* k_cache;                    // (N, Hk, bs, D) contiguous, 16-byte aligned, written
  void* v_cache;                    // likewise
  const float* cos;                 // (T, D/2) contiguous
  const float* sin;                 // (T, D/2) contiguous
  const int64_t* slot_mapping;      // (T,) slot s is row s % bs of block s / bs
  const int32_t* block_tables;      // (B, max_blocks)
  const int32_t* context_lens;      // (B,) tokens in the cache after this step
  const int32_t* query_start_loc;   // (B+1,) sequence b's tokens are [qsl[b], qsl[b+1])
  int32_t* status;                  // (B+1,) workspace: per-sequence check result
  float* part_out;                  // (T, Hq, num_splits, D) workspace when num_splits > 1
  float* part_lse;                  // (T, Hq, num_splits) workspace when num_splits > 1
  int64_t num_tokens, num_seqs, num_heads, num_kv_heads, head_dim;   // T, B, Hq, Hk, D
  int64_t num_blocks, block_size, max_blocks;                        // N, bs, table width
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh;                        // element strides
  float scale;                      // applied to q.k before soft-capping
  int32_t window;                   // > 0: a token at position p sees positions > p - window
  float softcap;                    // > 0: scores s become softcap * tanh(s / softcap)
  int32_t num_splits;               // KV splits per query tile (parallax_paged_num_splits)
  int32_t dtype;                    // PARALLAX_F16, PARALLAX_BF16 or PARALLAX_F32
} ParallaxPagedAttention;

// Head dims the paged kernel is built for (others go to the torch reference).
int parallax_paged_head_dim_ok(int64_t D);

// Launches the paged kernel. Metadata is checked on the device: a sequence with a bad
// length, slot or block id reads nothing from the cache, writes nothing into it and gets NaN
// outputs; a broken query_start_loc makes every sequence bad. Returns cudaErrorInvalidValue
// for unsupported shapes.
int parallax_paged_attention(const ParallaxPagedAttention* p, cudaStream_t stream);

// How many KV splits the paged kernel should use: > 1 only when the batch alone leaves most
// multiprocessors of `device` idle. max_context bounds the context lengths (bs * max_blocks).
int parallax_paged_num_splits(int64_t T, int64_t B, int64_t Hq, int64_t Hk, int64_t max_context,
                              int device);

// Weight-only int8 matmul for small M: out (M, N) = x (M, K) @ (qweight (N, K) * scales[:, None]).T
// + bias. x, out, scales, bias in the same float dtype; bias may be null. M <= 16, K % 16 == 0,
// all pointers 16-byte aligned, everything contiguous.
int parallax_int8_linear(void* out, const void* x, const int8_t* qweight, const void* scales,
                         const void* bias, int64_t M, int64_t N, int64_t K, int dtype,
                         cudaStream_t stream);

#ifdef __cplusplus
}
#endif
