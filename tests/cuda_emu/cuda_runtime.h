// A CPU emulation of the parts of the CUDA runtime and device API parallax's kernels use
// (tests/cuda_emu/__init__.py explains): a block's threads are std::threads with real
// barriers, shuffles go through a per-warp buffer. Kernel logic only; slow by design.
#pragma once
#include <vector_types.h>
#include <vector_functions.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

template <class... A>
inline cudaError_t cudaFuncSetAttribute(void (*)(A...), cudaFuncAttribute, int) { return cudaSuccess; }

using std::max;
using std::min;

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {
struct Block {
  explicit Block(unsigned n, size_t smem_bytes)
      : bar(n), smem(smem_bytes + 64), shfl((n + 31) / 32 * 32), nwarps((n + 31) / 32) {
    for (unsigned w = 0; w < nwarps; ++w)
      warp.emplace_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<float4> smem;
  std::vector<float> shfl;
  unsigned nwarps;
  std::atomic<int> or_acc{0};
};
inline thread_local Block* blk = nullptr;

// Runs the grid block after block on blockDim.x threads started once per launch.
template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, void*, A... args) {
  const unsigned n = block.x * block.y * block.z;
  const unsigned long total = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
  std::barrier<> step(n);
  std::unique_ptr<Block> current;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t)
    threads.emplace_back([&, t] {
      for (unsigned long i = 0; i < total; ++i) {
        if (t == 0) current = std::make_unique<Block>(n, smem);
        step.arrive_and_wait();
        blk = current.get();
        threadIdx = make_uint3(t, 0, 0);
        blockIdx = make_uint3(i % grid.x, i / grid.x % grid.y, i / grid.x / grid.y);
        blockDim = block;
        gridDim = grid;
        kernel(args...);
        blk->bar.arrive_and_drop();  // an exited thread leaves the block's barriers
        blk->warp[t / 32]->arrive_and_drop();
        step.arrive_and_wait();      // every thread is done before the block is replaced
      }
    });
  for (auto& t : threads) t.join();
}
}  // namespace emu

inline void __syncthreads() { emu::blk->bar.arrive_and_wait(); }
inline int __syncthreads_or(int p) {
  emu::Block* b = emu::blk;
  if (p) b->or_acc.store(1);
  b->bar.arrive_and_wait();
  const int r = b->or_acc.load();
  b->bar.arrive_and_wait();
  if (threadIdx.x == 0) b->or_acc.store(0);
  b->bar.arrive_and_wait();
  return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::blk->warp[threadIdx.x / 32]->arrive_and_wait(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  emu::Block* b = emu::blk;
  float* buf = b->shfl.data() + threadIdx.x / 32 * 32;
  buf[threadIdx.x % 32] = static_cast<float>(v);
  __syncwarp();
  const T r = static_cast<T>(buf[(threadIdx.x % 32) ^ o]);
  __syncwarp();
  return r;
}
template <class T>
inline T __ldg(const T* p) { return *p; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= ((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
