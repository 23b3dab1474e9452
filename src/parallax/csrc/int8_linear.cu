// Weight-only int8 matmul for small batches (M <= 16): y = x @ (qweight * scales[:, None]).T + b.
//
// The weights dominate the bytes (N*K int8 against M*K + M*N half-precision values), so the
// kernel streams each weight row exactly once: a warp owns R output channels, each lane loads
// 16 int8 weights of a row per step (a warp reads 512 contiguous bytes), converts them to
// fp32, and multiplies them with all M rows of x (x is small and stays in L1/L2). Partial sums
// are reduced across the warp once per output. The per-channel scale is applied to the fp32
// sum, so the result is rounded once.
//
// int8 -> fp32 without the slow I2F path: flipping the sign bit turns a signed byte s into the
// unsigned byte s + 128; placing it in the low mantissa bits of 2^23 gives the float
// 2^23 + s + 128 (byte_perm), and one exact subtraction leaves s.
#include "cuda_common.h"

namespace parallax {
namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 2;  // 16-byte weight loads in flight per lane and row

__device__ __forceinline__ void int8x16_to_float(const uint4& w, float (&f)[16]) {
  const uint32_t words[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u,
                             w.w ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t bits = __byte_perm(words[i], 0x4B000000u, 0x7440u | j);
      f[4 * i + j] = __uint_as_float(bits) - 8388736.0f;  // 2^23 + 128
    }
  }
}

// MT: rows of x handled (M rounded up to a power of two), R: output channels per warp.
template <typename T, int MT, int R>
__global__ void __launch_bounds__(kWarps * 32)
    int8_linear_kernel(T* __restrict__ out, const T* __restrict__ x,
                       const int8_t* __restrict__ qweight, const T* __restrict__ scales,
                       const T* __restrict__ bias, int M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * R;
  if (n0 >= N) return;

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  constexpr int64_t kStep = 32 * 16;  // bytes of a weight row one warp covers per load
  for (int64_t kb = 0; kb < K; kb += kStep * kUnroll) {
    uint4 w[kUnroll][R];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = kb + u * kStep + lane * 16;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = n0 + r;
        w[u][r] = (k < K && n < N)
                      ? __ldg(reinterpret_cast<const uint4*>(qweight + n * K + k))
                      : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = kb + u * kStep + lane * 16;
      if (k >= K) continue;
      float wf[R][16];
#pragma unroll
      for (int r = 0; r < R; ++r) int8x16_to_float(w[u][r], wf[r]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= M) break;
        const uint4* xp = reinterpret_cast<const uint4*>(x + m * K + k);
        float lo[8], hi[8];
        Vec8<T>::to_float(__ldg(xp), lo);
        Vec8<T>::to_float(__ldg(xp + 1), hi);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[r][i], lo[i], acc[r][m]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[r][8 + i], hi[i], acc[r][m]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == 0 && m < M && n < N) {
        float y = s * to_float(scales[n]);
        if (bias) y += to_float(bias[n]);
        out[m * N + n] = from_float<T>(y);
      }
    }
  }
}

template <typename T, int MT, int R>
int launch(void* out, const void* x, const int8_t* qweight, const void* scales, const void* bias,
           int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const int64_t per_block = kWarps * R;
  const int64_t blocks = (N + per_block - 1) / per_block;
  int8_linear_kernel<T, MT, R><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(x), qweight, static_cast<const T*>(scales),
      static_cast<const T*>(bias), static_cast<int>(M), N, K);
  return launch_status();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace
}  // namespace parallax

extern "C" int parallax_int8_linear(void* out, const void* x, const int8_t* qweight,
                                    const void* scales, const void* bias, int64_t M, int64_t N,
                                    int64_t K, int dtype, cudaStream_t stream) {
  using namespace parallax;
  if (M == 0 || N == 0) return 0;
  if (M < 0 || M > 16 || K % 16 != 0 || !aligned16(x) || !aligned16(qweight))
    return static_cast<int>(cudaErrorInvalidValue);
  PARALLAX_DISPATCH_DTYPE(dtype, [&] {
    // More x rows per weight load make the kernel compute-bound sooner; more channels per
    // warp let the x loads (L1 traffic) serve several weight rows.
    if (M == 1) return launch<scalar_t, 1, 1>(out, x, qweight, scales, bias, M, N, K, stream);
    if (M == 2) return launch<scalar_t, 2, 1>(out, x, qweight, scales, bias, M, N, K, stream);
    if (M <= 4) return launch<scalar_t, 4, 2>(out, x, qweight, scales, bias, M, N, K, stream);
    if (M <= 8) return launch<scalar_t, 8, 2>(out, x, qweight, scales, bias, M, N, K, stream);
    return launch<scalar_t, 16, 2>(out, x, qweight, scales, bias, M, N, K, stream);
  });
}
