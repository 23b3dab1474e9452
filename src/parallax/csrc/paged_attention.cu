// Paged attention for a flat batch of mixed prefill and decode tokens.
//
// The twin of reference.paged_attention_with_kvcache and of csrc/cpu/paged_attention_f32.c:
// rotate q and the new k (HF rotate_half layout), write the new k and v into their cache
// slots, then let every new token attend causally to its sequence's cached tokens through
// the sequence's block table (GQA: query heads h*G .. h*G+G-1 share KV head h), optionally
// only to the last `window` positions (sliding window) and with soft-capped scores (Gemma 2).
// fp32, fp16 and bf16 storage; every sum in fp32, online softmax in the log2 domain.
// ops.h (ParallaxPagedAttention) gives the layouts.
//
// Up to four launches on the caller's stream:
//  1. validate, one block per sequence: query_start_loc runs from 0 to T with >= 1 token per
//     sequence; context_lens >= new tokens; the blocks a length needs fit the table and lie
//     in [0, N); the sequence's slots lie in [0, N * bs). status[b] = 0 or an error code;
//     status[B] = 1 when the partition of tokens into sequences is itself broken: then every
//     sequence is bad and this kernel fills the whole output with NaN.
//  2. write, one block per new token: rotated k and v into slot_mapping[t], unless the
//     token's sequence is bad.
//  3. attention, grid (query tile, KV head x split, sequence). A tile is kRows query rows
//     (token, head of the KV group), token-major, of one sequence; warp w owns rows w,
//     w + kWarps, ... The block streams the keys its rows need (causal, window) through
//     shared memory, kKeys per tile: a lane scores one key for kRowsPerWarp rows, each row
//     keeps its own online softmax, and a lane accumulates D/32 output elements. The grid's
//     tile count is sized from T on the host (no host sync): tiles past a sequence's rows
//     exit at once.
//  4. with num_splits > 1 (flash-decoding, for batches that leave the GPU idle), each block
//     covers one slice of its key range and writes a partial result plus its log-sum-exp;
//     split_combine_kernel (cuda_common.h) merges them.
// A bad sequence reads nothing from the cache, writes nothing into it, and gets NaN outputs;
// the other sequences of the batch run normally. parallax.ops refuses bad metadata on the
// host before launching, except while a CUDA graph is captured; this is the last defence.
#include <math.h>

#include "cuda_common.h"

namespace parallax {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kKeys = 32;                     // keys per shared-memory tile: one per lane
constexpr float kLog2e = 1.4426950408889634f;

enum : int { kOk = 0, kBadSlot = 1, kBadLength = 2, kBadBlock = 3, kBadQuery = 4 };

template <int D>
constexpr size_t smem_bytes() {
  // K tile padded to D + 1 columns: lane j reads key j, so rows must fall on different banks.
  return sizeof(float) * (kKeys * (D + 1) + kKeys * D + kRows * D + kRows * kKeys);
}

// 8 consecutive cache elements (16-byte aligned for half types, 32 for float) as float.
__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  Vec8<T>::to_float(__ldg(reinterpret_cast<const uint4*>(p)), f);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Element d of row x (D values) rotated by (cos, sin) of its pair: rotate_half layout.
__device__ __forceinline__ float rotate(float xd, float partner, int d, int half, float c,
                                        float s) {
  return d < half ? xd * c - partner * s : xd * c + partner * s;
}

template <typename T>
__global__ void __launch_bounds__(128) validate_kernel(const ParallaxPagedAttention p) {
  const int b = blockIdx.x;
  const int B = static_cast<int>(p.num_seqs);
  const int32_t* qsl = p.query_start_loc;
  int broken = qsl[0] != 0 || qsl[B] != p.num_tokens;
  for (int i = threadIdx.x; i < B; i += blockDim.x) broken |= qsl[i + 1] - qsl[i] < 1;
  broken = __syncthreads_or(broken);
  int code = kBadQuery;
  if (!broken) {  // uniform over the block
    const int64_t q0 = qsl[b], n = qsl[b + 1] - q0;
    const int64_t len = p.context_lens[b];
    const int64_t nb = (len + p.block_size - 1) / p.block_size;
    code = kBadLength;
    if (len >= n && nb <= p.max_blocks) {
      const int32_t* table = p.block_tables + b * p.max_blocks;
      // Entries before the window's first block are never read (the engine may have freed
      // them): reference.first_block_read.
      const int64_t first = p.window > 0
          ? max(static_cast<int64_t>(0), len - n + 1 - p.window) / p.block_size : 0;
      int bad_block = 0, bad_slot = 0;
      for (int64_t i = first + threadIdx.x; i < nb; i += blockDim.x)
        bad_block |= table[i] < 0 || table[i] >= p.num_blocks;
      const int64_t capacity = p.num_blocks * p.block_size;
      for (int64_t t = q0 + threadIdx.x; t < q0 + n; t += blockDim.x)
        bad_slot |= p.slot_mapping[t] < 0 || p.slot_mapping[t] >= capacity;
      bad_block = __syncthreads_or(bad_block);
      bad_slot = __syncthreads_or(bad_slot);
      code = bad_block ? kBadBlock : bad_slot ? kBadSlot : kOk;
    }
  }
  if (threadIdx.x == 0) {
    p.status[b] = code;
    if (b == 0) p.status[B] = broken;
  }
  if (!broken) return;
  // No sequence owns a well-defined set of rows: every output row (and every partial the
  // combine pass reads) becomes NaN.
  const int64_t row_elems = p.num_heads * p.head_dim;
  T* out = static_cast<T*>(p.out);
  for (int64_t t = b; t < p.num_tokens; t += B)
    for (int64_t e = threadIdx.x; e < row_elems; e += blockDim.x)
      out[t * row_elems + e] = from_float<T>(NAN);
  if (p.num_splits > 1) {
    const int64_t ns = p.num_splits;
    for (int64_t t = b; t < p.num_tokens; t += B)
      for (int64_t e = threadIdx.x; e < row_elems * ns; e += blockDim.x) {
        p.part_out[t * row_elems * ns + e] = NAN;
        if (e % p.head_dim == 0) p.part_lse[(t * row_elems * ns + e) / p.head_dim] = 0.f;
      }
  }
}

template <typename T>
__global__ void __launch_bounds__(128) write_kernel(const ParallaxPagedAttention p) {
  const int64_t t = blockIdx.x;
  const int B = static_cast<int>(p.num_seqs);
  if (p.status[B] != 0) return;
  // Token t's sequence: the last b with qsl[b] <= t (qsl is increasing once validated).
  const int32_t* qsl = p.query_start_loc;
  int lo = 0, hi = B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (qsl[mid] <= t) lo = mid; else hi = mid - 1;
  }
  if (p.status[lo] != kOk) return;
  const int64_t s = p.slot_mapping[t], bs = p.block_size, D = p.head_dim, Hk = p.num_kv_heads;
  const int half = static_cast<int>(D / 2);
  const T* k = static_cast<const T*>(p.k) + t * p.k_st;
  const T* v = static_cast<const T*>(p.v) + t * p.v_st;
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  for (int64_t e = threadIdx.x; e < Hk * D; e += blockDim.x) {
    const int64_t h = e / D;
    const int d = static_cast<int>(e % D);
    const T* kh = k + h * p.k_sh;
    const float c = p.cos[t * half + d % half], sn = p.sin[t * half + d % half];
    const float y = rotate(to_float(kh[d]), to_float(kh[d < half ? d + half : d - half]), d,
                           half, c, sn);
    const int64_t at = (((s / bs) * Hk + h) * bs + s % bs) * D + d;
    kc[at] = from_float<T>(y);
    vc[at] = v[h * p.v_sh + d];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_kernel(const ParallaxPagedAttention p) {
  constexpr int J = D / 32;  // output elements per lane and row
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);  // [kKeys][D + 1]
  float* Vs = Ks + kKeys * (D + 1);             // [kKeys][D]
  float* Qs = Vs + kKeys * D;                   // [kRows][D]: rotated, times scale
  float* Ps = Qs + kRows * D;                   // [kRows][kKeys]: a tile's probabilities

  const int b = blockIdx.z;
  const int ns = p.num_splits;
  const int h = blockIdx.y / ns, split = blockIdx.y % ns;
  const int G = static_cast<int>(p.num_heads / p.num_kv_heads);
  const int64_t q0 = p.query_start_loc[b];
  const int64_t n = p.query_start_loc[b + 1] - q0;
  const bool bad = p.status[b] != kOk;
  // A broken partition's rows were filled with NaN by the validate kernel.
  if (bad && (n < 1 || q0 < 0 || q0 + n > p.num_tokens)) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t r1 = min(n * G, r0 + kRows);  // this block's rows [r0, r1) of the sequence
  if (r0 >= r1) return;                         // uniform over the block

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int half = D / 2;
  const int64_t first_pos = bad ? 0 : p.context_lens[b] - n;  // position of token q0

  // The keys any row of the block needs: up to the last row's position, from the first
  // row's window start; this split's slice of them, in whole tiles.
  int64_t lo = 0, hi = 0;
  if (!bad) {
    hi = first_pos + (r1 - 1) / G + 1;
    if (p.window > 0) lo = max(static_cast<int64_t>(0), first_pos + r0 / G - p.window + 1);
  }
  int64_t chunk = (hi - lo + ns - 1) / ns;
  chunk = (chunk + kKeys - 1) / kKeys * kKeys;
  const int64_t k_lo = lo + split * chunk, k_hi = min(hi, k_lo + chunk);

  const T* q = static_cast<const T*>(p.q);
  for (int e = threadIdx.x; e < kRows * D; e += kThreads) {
    const int lr = e / D, d = e % D;
    const int64_t r = r0 + lr;
    float y = 0.f;
    if (r < r1 && !bad) {
      const int64_t t = q0 + r / G;
      const T* qr = q + t * p.q_st + (static_cast<int64_t>(h) * G + r % G) * p.q_sh;
      y = rotate(to_float(qr[d]), to_float(qr[d < half ? d + half : d - half]), d, half,
                 p.cos[t * half + d % half], p.sin[t * half + d % half]) * p.scale;
    }
    Qs[e] = y;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][J];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) acc[i][j] = 0.f;
  }

  const int32_t* table = p.block_tables + b * p.max_blocks;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t bs = p.block_size, Hk = p.num_kv_heads;
  for (int64_t kt = k_lo; kt < k_hi; kt += kKeys) {
    __syncthreads();  // the previous tile is consumed (and Qs is complete on the first pass)
    for (int c = threadIdx.x; c < kKeys * (D / 8); c += kThreads) {
      const int key = c / (D / 8), part = (c % (D / 8)) * 8;
      const int64_t pk = kt + key;
      float kf[8], vf[8];
      if (pk < k_hi) {
        const int64_t at = ((table[pk / bs] * Hk + h) * bs + pk % bs) * D + part;
        load8(k_cache + at, kf);
        load8(v_cache + at, vf);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) kf[i] = vf[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        Ks[key * (D + 1) + part + i] = kf[i];
        Vs[key * D + part + i] = vf[i];
      }
    }
    __syncthreads();

    float s[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.f;
    const float* kr = Ks + lane * (D + 1);
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float k0 = kr[d], k1 = kr[d + 1], k2 = kr[d + 2], k3 = kr[d + 3];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float4 qv = *reinterpret_cast<const float4*>(Qs + (i * kWarps + warp) * D + d);
        s[i] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, s[i]))));
      }
    }

    const int64_t key = kt + lane;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int lr = i * kWarps + warp;
      if (r0 + lr >= r1) continue;  // uniform over the warp
      float x = s[i];
      if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
      const int64_t pos = first_pos + (r0 + lr) / G;  // the row's token position
      const bool valid = key < k_hi && key <= pos && (p.window <= 0 || key > pos - p.window);
      x = valid ? x * kLog2e : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(x));
      if (m_new == -INFINITY) continue;  // no key of this row seen yet (uniform)
      const float corr = exp2f(m[i] - m_new);
      const float pe = exp2f(x - m_new);  // 0 for masked keys
      l[i] = l[i] * corr + warp_sum(pe);
      m[i] = m_new;
      Ps[lr * kKeys + lane] = pe;
      __syncwarp();
#pragma unroll
      for (int j = 0; j < J; ++j) acc[i][j] *= corr;
      for (int kk = 0; kk < kKeys; ++kk) {
        const float pk = Ps[lr * kKeys + kk];
#pragma unroll
        for (int j = 0; j < J; ++j) acc[i][j] = fmaf(pk, Vs[kk * D + lane + 32 * j], acc[i][j]);
      }
      __syncwarp();
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = r0 + i * kWarps + warp;
    if (r >= r1) continue;
    const int64_t row = (q0 + r / G) * p.num_heads + static_cast<int64_t>(h) * G + r % G;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const float res = bad ? NAN : acc[i][j] * inv;
      const int d = lane + 32 * j;
      if (ns == 1) out[row * D + d] = from_float<T>(res);
      else p.part_out[(row * ns + split) * D + d] = res;
    }
    // A bad sequence: split 0 carries the NaN with weight 1 through the combine pass.
    if (ns > 1 && lane == 0)
      p.part_lse[row * ns + split] = bad ? (split == 0 ? 0.f : -INFINITY)
                                         : (l[i] > 0.f ? m[i] + log2f(l[i]) : -INFINITY);
  }
}

template <typename T, int D>
int launch(const ParallaxPagedAttention& p, cudaStream_t stream) {
  const unsigned B = static_cast<unsigned>(p.num_seqs);
  validate_kernel<T><<<B, 128, 0, stream>>>(p);
  if (int err = launch_status()) return err;
  if (p.num_tokens > 0) {
    write_kernel<T><<<static_cast<unsigned>(p.num_tokens), 128, 0, stream>>>(p);
    if (int err = launch_status()) return err;
  }
  // Tiles per sequence: the longest possible one has T - (B - 1) tokens.
  const int64_t G = p.num_heads / p.num_kv_heads;
  const int64_t longest = p.num_tokens > p.num_seqs ? p.num_tokens - p.num_seqs + 1 : 1;
  const dim3 grid(static_cast<unsigned>((longest * G + kRows - 1) / kRows),
                  static_cast<unsigned>(p.num_kv_heads * p.num_splits), B);
  constexpr size_t smem = smem_bytes<D>();
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(attention_kernel<T, D>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  attention_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  if (int err = launch_status()) return err;
  if (p.num_splits > 1 && p.num_tokens > 0) {
    split_combine_kernel<T, D><<<static_cast<unsigned>(p.num_tokens * p.num_heads), D, 0,
                                 stream>>>(static_cast<T*>(p.out), p.part_out, p.part_lse,
                                           p.num_splits);
    return launch_status();
  }
  return 0;
}

template <typename T>
int launch_d(const ParallaxPagedAttention& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, stream);
    case 96: return launch<T, 96>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace
}  // namespace parallax

extern "C" int parallax_paged_head_dim_ok(int64_t D) {
  return D == 64 || D == 96 || D == 128 || D == 256;
}

extern "C" int parallax_paged_num_splits(int64_t T, int64_t B, int64_t Hq, int64_t Hk,
                                         int64_t max_context, int device) {
  using namespace parallax;
  if (T <= 0 || B <= 0 || Hk <= 0 || Hq % Hk != 0 || max_context <= 0) return 1;
  const int64_t G = Hq / Hk;
  // Busy blocks without splitting: every sequence has a tile, long ones several.
  const int64_t tiles = max((T * G + kRows - 1) / kRows, B);
  const int64_t blocks = Hk * tiles;
  int sms = parallax_num_sms(device);
  if (sms <= 0) sms = 108;
  // About two blocks per multiprocessor, splits of at least 512 keys, at most 32 partials.
  int64_t splits = (2 * sms + blocks - 1) / blocks;
  const int64_t by_len = (max_context + 511) / 512;
  if (splits > by_len) splits = by_len;
  if (splits > 32) splits = 32;
  if (Hk * splits > 65535) splits = 65535 / Hk;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

extern "C" int parallax_paged_attention(const ParallaxPagedAttention* p, cudaStream_t stream) {
  using namespace parallax;
  if (p->num_seqs == 0) return p->num_tokens == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  if (p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads != 0 || p->block_size <= 0 ||
      p->num_splits < 1 || p->num_seqs > 65535 || p->num_kv_heads * p->num_splits > 65535 ||
      p->num_tokens > 0x7fffffff || !parallax_paged_head_dim_ok(p->head_dim) ||
      (p->num_splits > 1 && (p->part_out == nullptr || p->part_lse == nullptr)) ||
      p->status == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  switch (p->dtype) {
    case PARALLAX_F32: return launch_d<float>(*p, stream);
    case PARALLAX_F16: return launch_d<__half>(*p, stream);
    case PARALLAX_BF16: return launch_d<__nv_bfloat16>(*p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
