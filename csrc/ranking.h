// Ranking rules written once for the C++ CPU kernels (g++) and the CUDA kernels (nvcc):
// the NaN rule of distances, the peak rule, and the order-preserving image of a float that
// every sort key is built from. No torch headers: csrc/cuda/*.cu include it.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RETAKE_HD __host__ __device__ __forceinline__
#else
#define RETAKE_HD inline
#endif

namespace retake {

// NaN counts as -inf, so a non-finite distance never outranks a finite one.
RETAKE_HD float rank_value(float v) { return v != v ? -INFINITY : v; }

// A uint32 image of v that orders like v: v < w <=> ordered_bits(v) < ordered_bits(w) for
// non-NaN v, w (callers map NaN first); -0.0 and +0.0 share one image. Positive floats order
// like their bits, negative ones reversed: flip all bits of negatives, set the sign of the rest.
RETAKE_HD uint32_t ordered_bits(float v) {
  v = v == 0.0f ? 0.0f : v;  // -0.0 -> +0.0
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// nms_select's rank key: a smaller key is a better frame (score descending, then index ascending).
RETAKE_HD uint64_t nms_rank_key(float v, uint32_t j) { return (uint64_t(~ordered_bits(v)) << 32) | j; }

// t is a peak iff x[t] is the first maximum of x[t-h .. t+h] clipped to [0, T): strictly greater
// than everything on its left, not smaller than anything on its right. `get(j)` returns x[j]
// already passed through rank_value. Small windows are scanned without branches (peaks of noisy
// curves are unpredictable), large ones stop at the first loss.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Get>
RETAKE_HD bool is_peak(const Get& get, int64_t T, int64_t t, int64_t half) {
  const float v = get(t);
  const int64_t lo = t - half < 0 ? 0 : t - half;
  const int64_t hi = t + half >= T ? T - 1 : t + half;
  if (half <= 8) {
    bool ok = true;
    for (int64_t j = lo; j < t; ++j) ok &= get(j) < v;
    for (int64_t j = t + 1; j <= hi; ++j) ok &= get(j) <= v;
    return ok;
  }
  for (int64_t j = lo; j < t; ++j)
    if (get(j) >= v) return false;
  for (int64_t j = t + 1; j <= hi; ++j)
    if (get(j) > v) return false;
  return true;
}

}  // namespace retake
