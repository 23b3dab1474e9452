// RMSNorm and fused residual-add + RMSNorm: one block per row.
//
// Pass 1 reads x (+ residual), writes the rounded sum to residual_out and accumulates the sum
// of squares of that rounded value in fp32 (the reference normalises the rounded residual).
// Pass 2 re-reads the row (an L1/L2 hit: a row is a few KB) and writes the normalised output.
// Bytes: 2 reads + 2 writes of a row for add_rms_norm (x, residual in; residual, out out),
// 1 read + 1 write for rms_norm, plus the weight (cached across rows).
#include "cuda_common.h"

namespace parallax {
namespace {

__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < nwarps) ? smem[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  return smem[0];
}

// VEC: 16-byte accesses (d % 8 == 0 and aligned pointers), else one element per access.
template <typename T, bool VEC>
__global__ void add_rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out,
                                    const T* __restrict__ x, const T* __restrict__ residual,
                                    const T* __restrict__ weight, int64_t d, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* rr = residual ? residual + row * d : nullptr;
  T* ror = residual ? residual_out + row * d : nullptr;
  // After pass 1 the row to normalise lives in residual_out (fused) or x (plain).
  const T* src = residual ? ror : xr;
  T* orow = out + row * d;
  float ss = 0.f;
  if constexpr (VEC) {
    const int64_t nvec = d / 8;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float a[8];
      Vec8<T>::to_float(reinterpret_cast<const uint4*>(xr)[i], a);
      if (rr) {
        float b[8];
        Vec8<T>::to_float(reinterpret_cast<const uint4*>(rr)[i], b);
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] += b[j];
        const uint4 packed = Vec8<T>::from_float(a);
        reinterpret_cast<uint4*>(ror)[i] = packed;
        Vec8<T>::to_float(packed, a);  // the rounded value, as the reference sees it
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += a[j] * a[j];
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      float a = to_float(xr[i]);
      if (rr) {
        const T s = from_float<T>(a + to_float(rr[i]));
        ror[i] = s;
        a = to_float(s);
      }
      ss += a * a;
    }
  }
  const float rstd = rsqrtf(block_sum(ss, smem) / static_cast<float>(d) + eps);
  if constexpr (VEC) {
    const int64_t nvec = d / 8;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float a[8], w[8];
      Vec8<T>::to_float(reinterpret_cast<const uint4*>(src)[i], a);
      Vec8<T>::to_float(reinterpret_cast<const uint4*>(weight)[i], w);
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = (a[j] * rstd) * w[j];
      reinterpret_cast<uint4*>(orow)[i] = Vec8<T>::from_float(a);
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
      orow[i] = from_float<T>((to_float(src[i]) * rstd) * to_float(weight[i]));
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace
}  // namespace parallax

extern "C" int parallax_add_rms_norm(void* out, void* residual_out, const void* x,
                                     const void* residual, const void* weight, int64_t rows,
                                     int64_t d, float eps, int dtype, cudaStream_t stream) {
  using namespace parallax;
  if (rows <= 0 || d <= 0) return 0;
  if (rows > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = d % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(weight) &&
                   (!residual || (aligned16(residual) && aligned16(residual_out)));
  const int64_t work = vec ? d / 8 : d;
  int threads = static_cast<int>(((work + 31) / 32) * 32);
  threads = threads < 32 ? 32 : (threads > 512 ? 512 : threads);
  PARALLAX_DISPATCH_DTYPE(dtype, [&] {
    auto* o = static_cast<scalar_t*>(out);
    auto* ro = static_cast<scalar_t*>(residual_out);
    auto* xp = static_cast<const scalar_t*>(x);
    auto* rp = static_cast<const scalar_t*>(residual);
    auto* wp = static_cast<const scalar_t*>(weight);
    if (vec)
      add_rms_norm_kernel<scalar_t, true>
          <<<static_cast<unsigned>(rows), threads, 0, stream>>>(o, ro, xp, rp, wp, d, eps);
    else
      add_rms_norm_kernel<scalar_t, false>
          <<<static_cast<unsigned>(rows), threads, 0, stream>>>(o, ro, xp, rp, wp, d, eps);
    return launch_status();
  });
}
