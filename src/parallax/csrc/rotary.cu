// Rotary position embedding applied in place to q and k (HF rotate_half layout).
//
// One block per (b, t) token; its threads walk every (head, pair) of q then k. cos/sin for
// the token are read once per pair index and stay in L1 across heads. Bytes: q and k read and
// written once, cos/sin read once per token.
#include "cuda_common.h"

namespace parallax {
namespace {

template <typename T>
__global__ void rotary_kernel(T* __restrict__ q, T* __restrict__ k, const float* __restrict__ cos,
                              const float* __restrict__ sin, int64_t T_len, int64_t Hq,
                              int64_t Hk, int64_t D, int64_t q_sb, int64_t q_st, int64_t q_sh,
                              int64_t k_sb, int64_t k_st, int64_t k_sh) {
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / T_len, t = bt % T_len;
  const int64_t half = D / 2;
  const float* c = cos + bt * half;
  const float* s = sin + bt * half;
  T* qt = q + b * q_sb + t * q_st;
  T* kt = k + b * k_sb + t * k_st;
  const int64_t total = (Hq + Hk) * half;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx % half;
    T* row = h < Hq ? qt + h * q_sh : kt + (h - Hq) * k_sh;
    const float x1 = to_float(row[i]), x2 = to_float(row[i + half]);
    const float cv = c[i], sv = s[i];
    row[i] = from_float<T>(x1 * cv - x2 * sv);
    row[i + half] = from_float<T>(x2 * cv + x1 * sv);
  }
}

}  // namespace
}  // namespace parallax

extern "C" int parallax_rotary_embedding(void* q, void* k, const float* cos, const float* sin,
                                         int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t D,
                                         int64_t q_sb, int64_t q_st, int64_t q_sh, int64_t k_sb,
                                         int64_t k_st, int64_t k_sh, int dtype,
                                         cudaStream_t stream) {
  using namespace parallax;
  if (B * T == 0) return 0;
  if (D % 2 != 0 || B * T > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t work = (Hq + Hk) * (D / 2);
  int threads = static_cast<int>(((work + 31) / 32) * 32);
  threads = threads < 32 ? 32 : (threads > 512 ? 512 : threads);
  PARALLAX_DISPATCH_DTYPE(dtype, [&] {
    rotary_kernel<scalar_t><<<static_cast<unsigned>(B * T), threads, 0, stream>>>(
        static_cast<scalar_t*>(q), static_cast<scalar_t*>(k), cos, sin, T, Hq, Hk, D, q_sb,
        q_st, q_sh, k_sb, k_st, k_sh);
    return launch_status();
  });
}
