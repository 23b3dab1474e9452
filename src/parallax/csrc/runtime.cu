// Small runtime helpers the binding needs without including CUDA headers itself.
#include <cuda_runtime.h>

#include "ops.h"

extern "C" const char* parallax_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

extern "C" int parallax_num_sms(int device) {
  // Cached: called on every decode step to size the split-KV grid. A benign race at worst
  // writes the same value twice.
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error so later launches report their own
      return 0;
    }
    cache[device] = n;
  }
  return cache[device];
}
