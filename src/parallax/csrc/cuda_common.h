// Helpers shared by the .cu files (device code; include only from .cu files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "ops.h"

namespace parallax {

// 16-byte vectors of 8 half-precision values: the unit every memory-bound kernel here moves.
template <typename T>
struct Vec8;

template <>
struct Vec8<__half> {
  static __device__ __forceinline__ void to_float(const uint4& v, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 p = __half22float2(h[i]);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
  static __device__ __forceinline__ uint4 from_float(const float (&f)[8]) {
    uint4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

template <>
struct Vec8<__nv_bfloat16> {
  static __device__ __forceinline__ void to_float(const uint4& v, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 p = __bfloat1622float2(h[i]);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
  static __device__ __forceinline__ uint4 from_float(const float (&f)[8]) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Merges the partial results of a split-KV attention (flash-decoding's second pass): row
// `head` (one (token or sequence, query head) pair) has num_splits partials part_out
// (head, split, D), each normalised by its own softmax sum, and their log2-sum-exps part_lse
// (head, split); -inf marks an empty split. One block per row, one thread per element of D.
// A split with lse 0 and a NaN partial (how a kernel flags a bad request) makes the row NaN.
template <typename T, int D>
__global__ void __launch_bounds__(D)
    split_combine_kernel(T* __restrict__ out, const float* __restrict__ part_out,
                         const float* __restrict__ part_lse, int num_splits) {
  const int64_t head = blockIdx.x;
  const int d = threadIdx.x;
  const float* lse = part_lse + head * num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, lse[s]);
  float wsum = 0.f, o = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse[s] - mx);
      if (w > 0.f) {
        wsum += w;
        o += w * part_out[(head * num_splits + s) * D + d];
      }
    }
  }
  out[head * D + d] = from_float<T>(wsum > 0.f ? o / wsum : 0.f);
}

// Returns body() (an int status) run with scalar_t = __half or __nv_bfloat16 according to a
// dtype code; an unknown code returns cudaErrorInvalidValue.
#define PARALLAX_DISPATCH_DTYPE(dtype, ...)                            \
  do {                                                                 \
    if ((dtype) == PARALLAX_F16) {                                     \
      using scalar_t = __half;                                         \
      return (__VA_ARGS__)();                                          \
    } else if ((dtype) == PARALLAX_BF16) {                             \
      using scalar_t = __nv_bfloat16;                                  \
      return (__VA_ARGS__)();                                          \
    }                                                                  \
    return static_cast<int>(cudaErrorInvalidValue);                    \
  } while (0)

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace parallax
