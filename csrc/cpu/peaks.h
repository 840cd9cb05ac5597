// Peak rule shared by local_peaks_cpu and dpselect_cpu.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace retake {

// NaN counts as -inf, so a non-finite distance never outranks a finite one.
inline float rank_value(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

// t is a peak iff x[t] is the first maximum of x[t-h .. t+h] clipped to [0, T):
// strictly greater than everything on its left, not smaller than anything on its right.
// `get(j)` returns x[j] already passed through rank_value. Small windows are scanned without
// branches (peaks of noisy curves are unpredictable), large ones stop at the first loss.
template <typename Get>
inline bool is_peak(const Get& get, int64_t T, int64_t t, int64_t half) {
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

// Rows per parallel task so that each task has enough elements to outweigh scheduling.
inline int64_t rows_grain(int64_t T) { return T >= 16384 ? 1 : 16384 / (T > 0 ? T : 1); }

}  // namespace retake
