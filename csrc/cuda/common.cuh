// Device helpers shared by the .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common.h"

namespace retake {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// NaN counts as -inf, so a non-finite distance never outranks a finite one.
__device__ __forceinline__ float rank_value(float v) { return isnan(v) ? -INFINITY : v; }

// Same rule as csrc/cpu/peaks.h: x[t] is the first maximum of its clipped window.
// x points at element 0 of a column whose elements are `stride` apart.
template <typename T>
__device__ __forceinline__ bool is_peak(const T* x, int64_t stride, int64_t len, int64_t t, int64_t half) {
  const float v = rank_value(to_float(x[t * stride]));
  const int64_t lo = t - half < 0 ? 0 : t - half;
  const int64_t hi = t + half >= len ? len - 1 : t + half;
  for (int64_t j = lo; j < t; ++j)
    if (rank_value(to_float(x[j * stride])) >= v) return false;
  for (int64_t j = t + 1; j <= hi; ++j)
    if (rank_value(to_float(x[j * stride])) > v) return false;
  return true;
}

// Calls f with a typed null pointer for `dtype`, so templates can be picked at run time.
template <typename F>
__host__ void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(static_cast<const float*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<const __half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<const __nv_bfloat16*>(nullptr)); break;
  }
}

}  // namespace cuda
}  // namespace retake
