// Flash-decoding: attention of one new token per sequence against its KV cache.
//
// Grid (split, kv_head * q_chunks, batch). A block streams the rows [start, end) of one KV
// head's cache once and scores them against up to GQ query heads of that KV group (GQA: the
// KV head is read once for all its query heads). Each block writes a partial result
// normalised by its own softmax sum plus its log-sum-exp; a second kernel combines the splits.
// With one split the first kernel writes the output directly.
//
// Inside a block a "row group" of D/8 lanes owns one cache row at a time, each lane 8
// elements (one 16-byte load of K and one of V). Every row group runs its own online softmax
// over the rows it sees, so the loop needs no block-wide synchronisation; the groups are
// merged once at the end through shared memory. Rows of one iteration are consecutive across
// groups, so a warp's loads are contiguous.
//
// Split sizes follow each sequence's own context length (read on the device), so ragged
// batches need no host synchronisation: split s of sequence b covers
// [s * chunk_b, (s + 1) * chunk_b) with chunk_b = ceil(ctx_b / num_splits) rounded up to one
// block iteration. Splits past the end write an empty partial (lse = -inf).
//
// Scores are kept in the log2 domain: q is pre-multiplied by scale * log2(e) so exp2f serves.
#include <math.h>

#include "cuda_common.h"

namespace parallax {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D, int GQ>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(T* __restrict__ out, const T* __restrict__ q,
                        const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                        const int* __restrict__ context_lens, float* __restrict__ part_out,
                        float* __restrict__ part_lse, int Hq, int Hk, int64_t S, int64_t k_sb,
                        int64_t k_sh, int64_t v_sb, int64_t v_sh, float scale_log2,
                        int num_splits) {
  constexpr int L = D / 8;                  // lanes per row
  constexpr int kGroupsPerWarp = 32 / L;
  constexpr int kGroups = kWarps * kGroupsPerWarp;
  constexpr int kUnroll = GQ >= 8 ? 2 : 4;  // rows in flight per group (register budget)
  constexpr int kRowsPerIter = kGroups * kUnroll;

  __shared__ float s_acc[kGroups][GQ][D];
  __shared__ float s_m[kGroups][GQ];
  __shared__ float s_l[kGroups][GQ];

  const int split = blockIdx.x;
  const int G = Hq / Hk;
  const int q_chunks = (G + GQ - 1) / GQ;
  const int kvh = blockIdx.y / q_chunks;
  const int g0 = (blockIdx.y % q_chunks) * GQ;
  const int ng = min(GQ, G - g0);
  const int b = blockIdx.z;
  const int hq0 = kvh * G + g0;  // first query head of this block

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % L;                                 // which 8 elements of a row
  const int group = warp * kGroupsPerWarp + lane / L;       // which row group

  // A length outside [1, S] reads nothing and makes the output NaN (loud, never a read
  // outside the cache); ops/__init__.py refuses such lengths on the host where it can.
  int64_t ctx = context_lens[b];
  const bool bad = ctx < 1 || ctx > S;
  if (bad) ctx = 0;
  int64_t chunk = (ctx + num_splits - 1) / num_splits;
  chunk = ((chunk + kRowsPerIter - 1) / kRowsPerIter) * kRowsPerIter;
  const int64_t start = static_cast<int64_t>(split) * chunk;
  const int64_t end = min(ctx, start + chunk);

  // Query slice of every head in this block, fp32, pre-scaled into the log2 domain.
  float qf[GQ][8];
#pragma unroll
  for (int j = 0; j < GQ; ++j) {
    if (j < ng) {
      const T* qp = q + (static_cast<int64_t>(b) * Hq + hq0 + j) * D + sub * 8;
      Vec8<T>::to_float(*reinterpret_cast<const uint4*>(qp), qf[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[j][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[j][i] = 0.f;
    }
  }

  float m[GQ], l[GQ], acc[GQ][8];
#pragma unroll
  for (int j = 0; j < GQ; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[j][i] = 0.f;
  }

  const T* kbase = k_cache + b * k_sb + kvh * k_sh + sub * 8;
  const T* vbase = v_cache + b * v_sb + kvh * v_sh + sub * 8;

  for (int64_t base = start; base < end; base += kRowsPerIter) {
    uint4 kr[kUnroll], vr[kUnroll];
    bool valid[kUnroll];
    // Issue every load of the iteration before the first use.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = base + u * kGroups + group;
      valid[u] = row < end;
      if (valid[u]) {
        kr[u] = __ldg(reinterpret_cast<const uint4*>(kbase + row * D));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(vbase + row * D));
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[kUnroll][GQ];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      Vec8<T>::to_float(kr[u], kf);
#pragma unroll
      for (int j = 0; j < GQ; ++j) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(qf[j][i], kf[i], dot);
        // Every lane takes part in the shuffles; invalid rows are masked afterwards.
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[u][j] = valid[u] ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int j = 0; j < GQ; ++j) {
      float mx = m[j];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][j]);
      if (mx == -INFINITY) continue;  // no valid row seen by this group yet
      const float corr = exp2f(m[j] - mx);  // 0 when m[j] is -inf
      float p[kUnroll];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        p[u] = exp2f(s[u][j] - mx);  // 0 for masked rows
        psum += p[u];
      }
      l[j] = l[j] * corr + psum;
      m[j] = mx;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[j][i] *= corr;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float vf[8];
        Vec8<T>::to_float(vr[u], vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[j][i] = fmaf(p[u], vf[i], acc[j][i]);
      }
    }
  }

  // Merge the row groups of the block.
#pragma unroll
  for (int j = 0; j < GQ; ++j) {
    if (sub == 0) {
      s_m[group][j] = m[j];
      s_l[group][j] = l[j];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[group][j][sub * 8 + i] = acc[j][i];
  }
  __syncthreads();

  for (int t = threadIdx.x; t < ng * D; t += kThreads) {
    const int j = t / D, d = t % D;
    float mx = -INFINITY;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) mx = fmaxf(mx, s_m[g][j]);
    float lsum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float w = exp2f(s_m[g][j] - mx);  // 0 for groups that saw no row
        lsum += w * s_l[g][j];
        o += w * s_acc[g][j][d];
      }
    }
    const float res = bad ? NAN : (lsum > 0.f ? o / lsum : 0.f);
    const int64_t head = static_cast<int64_t>(b) * Hq + hq0 + j;
    if (num_splits == 1) {
      out[head * D + d] = from_float<T>(res);
    } else {
      part_out[(head * num_splits + split) * D + d] = res;
      // bad: split 0 carries the NaN with weight 1 through the combine kernel
      const float lse = bad ? (split == 0 ? 0.f : -INFINITY)
                            : (lsum > 0.f ? mx + log2f(lsum) : -INFINITY);
      if (d == 0) part_lse[head * num_splits + split] = lse;
    }
  }
}

template <typename T, int D, int GQ>
int launch(void* out, const void* q, const void* k, const void* v, const int* ctx,
           float* part_out, float* part_lse, int64_t B, int64_t Hq, int64_t Hk, int64_t S,
           int64_t k_sb, int64_t k_sh, int64_t v_sb, int64_t v_sh, float scale, int num_splits,
           cudaStream_t stream) {
  const int64_t G = Hq / Hk;
  const int64_t q_chunks = (G + GQ - 1) / GQ;
  const dim3 grid(num_splits, static_cast<unsigned>(Hk * q_chunks), static_cast<unsigned>(B));
  decode_split_kernel<T, D, GQ><<<grid, kThreads, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k),
      static_cast<const T*>(v), ctx, part_out, part_lse, static_cast<int>(Hq),
      static_cast<int>(Hk), S, k_sb, k_sh, v_sb, v_sh, scale * kLog2e, num_splits);
  int err = launch_status();
  if (err != 0 || num_splits == 1) return err;
  split_combine_kernel<T, D><<<static_cast<unsigned>(B * Hq), D, 0, stream>>>(
      static_cast<T*>(out), part_out, part_lse, num_splits);
  return launch_status();
}

template <typename T, int D>
int launch_gq(int gq, void* out, const void* q, const void* k, const void* v, const int* ctx,
              float* po, float* pl, int64_t B, int64_t Hq, int64_t Hk, int64_t S, int64_t k_sb,
              int64_t k_sh, int64_t v_sb, int64_t v_sh, float scale, int ns, cudaStream_t st) {
  switch (gq) {
    case 1: return launch<T, D, 1>(out, q, k, v, ctx, po, pl, B, Hq, Hk, S, k_sb, k_sh, v_sb, v_sh, scale, ns, st);
    case 2: return launch<T, D, 2>(out, q, k, v, ctx, po, pl, B, Hq, Hk, S, k_sb, k_sh, v_sb, v_sh, scale, ns, st);
    case 4: return launch<T, D, 4>(out, q, k, v, ctx, po, pl, B, Hq, Hk, S, k_sb, k_sh, v_sb, v_sh, scale, ns, st);
    default: return launch<T, D, 8>(out, q, k, v, ctx, po, pl, B, Hq, Hk, S, k_sb, k_sh, v_sb, v_sh, scale, ns, st);
  }
}

// Query heads handled per block: the GQA group rounded up to a power of two, at most 8
// (larger groups take several blocks per KV head).
inline int gq_bucket(int64_t G) { return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8; }

}  // namespace
}  // namespace parallax

extern "C" int parallax_decode_num_splits(int64_t B, int64_t Hq, int64_t Hk, int64_t S,
                                          int device) {
  using namespace parallax;
  if (B <= 0 || Hk <= 0 || S <= 0) return 1;
  const int64_t G = Hq / Hk;
  const int64_t gq = gq_bucket(G);
  const int64_t blocks = B * Hk * ((G + gq - 1) / gq);
  int sms = parallax_num_sms(device);
  if (sms <= 0) sms = 108;
  // Aim for about four blocks per multiprocessor, never splits shorter than 256 rows of the
  // cache capacity, and at most 64 partials to combine.
  int64_t splits = (4 * sms + blocks - 1) / blocks;
  const int64_t by_len = (S + 255) / 256;
  if (splits > by_len) splits = by_len;
  if (splits > 64) splits = 64;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

extern "C" int parallax_decode_attention(void* out, const void* q, const void* k_cache,
                                         const void* v_cache, const int* context_lens,
                                         float* part_out, float* part_lse, int64_t B, int64_t Hq,
                                         int64_t Hk, int64_t S, int64_t D, int64_t k_sb,
                                         int64_t k_sh, int64_t v_sb, int64_t v_sh, float scale,
                                         int num_splits, int dtype, cudaStream_t stream) {
  using namespace parallax;
  if (B == 0 || Hq == 0) return 0;
  if (Hk <= 0 || Hq % Hk != 0 || num_splits < 1 || B > 65535 ||
      (num_splits > 1 && (part_out == nullptr || part_lse == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  const int gq = gq_bucket(Hq / Hk);
  PARALLAX_DISPATCH_DTYPE(dtype, [&] {
    if (D == 64)
      return launch_gq<scalar_t, 64>(gq, out, q, k_cache, v_cache, context_lens, part_out,
                                     part_lse, B, Hq, Hk, S, k_sb, k_sh, v_sb, v_sh, scale,
                                     num_splits, stream);
    if (D == 128)
      return launch_gq<scalar_t, 128>(gq, out, q, k_cache, v_cache, context_lens, part_out,
                                      part_lse, B, Hq, Hk, S, k_sb, k_sh, v_sb, v_sh, scale,
                                      num_splits, stream);
    return static_cast<int>(cudaErrorInvalidValue);
  });
}
