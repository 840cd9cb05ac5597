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
// x has element stride `stride`; values go through rank_value.
template <typename Get>
inline bool is_peak(const Get& get, int64_t T, int64_t t, int64_t half) {
  const float v = get(t);
  const int64_t lo = t - half < 0 ? 0 : t - half;
  const int64_t hi = t + half >= T ? T - 1 : t + half;
  for (int64_t j = lo; j < t; ++j)
    if (get(j) >= v) return false;
  for (int64_t j = t + 1; j <= hi; ++j)
    if (get(j) > v) return false;
  return true;
}

}  // namespace retake
