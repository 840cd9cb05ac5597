// local_peaks CPU kernel: dist [..., T] (fp16/bf16/fp32, any strides) -> bool [..., T].
// A point is a peak iff it is the first maximum of its clipped window of
// `window` (odd) points; NaN counts as -inf. Rows run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/peaks.h"

namespace retake {

at::Tensor local_peaks_cpu(const at::Tensor& dist, int64_t window) {
  check_local_peaks_args(dist, window);
  const at::Tensor x = dist.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(dist.sizes(), dist.options().dtype(at::kBool));
  const int64_t T = dist.size(-1);
  const int64_t rows = T == 0 ? 0 : x.numel() / T;
  const float* px = x.data_ptr<float>();
  bool* po = out.data_ptr<bool>();
  const int64_t half = window / 2;
  at::parallel_for(0, rows, rows_grain(T), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(T);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t t = 0; t < T; ++t) row[t] = rank_value(px[r * T + t]);
      auto get = [&row](int64_t j) { return row[j]; };
      for (int64_t t = 0; t < T; ++t) po[r * T + t] = is_peak(get, T, t, half);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(retake, CPU, m) { m.impl("local_peaks", &local_peaks_cpu); }

}  // namespace retake
