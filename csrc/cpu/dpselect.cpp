// dpselect CPU kernel: frame distances, peaks and a per-column partial sort.
// Rank = (peak first, larger distance first, lower index first); NaN distance counts
// as -inf. The first k of the rank are returned ascending with their peak flags.
// sync: one column per batch row ([B,T] distances -> [B,k]); per patch: one column
// per (b, n) ([B,T,N] -> [B,k,N]). Columns run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/frame_distance.h"
#include "cpu/peaks.h"

namespace retake {

std::tuple<at::Tensor, at::Tensor> dpselect_cpu(const at::Tensor& feats, int64_t num_frames, int64_t window,
                                                bool sync, bool check_finite) {
  check_dpselect_args(feats, num_frames, window);
  const int64_t B = feats.size(0), T = feats.size(1), N = feats.size(2);
  const at::Tensor dist = frame_distance_cpu_impl(feats, sync, 1.0, check_finite, "dpselect");
  const int64_t k = num_frames, inner = sync ? 1 : N;
  auto opts = feats.options();
  at::Tensor idx = at::empty(sync ? at::IntArrayRef{B, k} : at::IntArrayRef{B, k, N}, opts.dtype(at::kLong));
  at::Tensor piv = at::empty(idx.sizes(), opts.dtype(at::kBool));
  if (idx.numel() == 0) return {idx, piv};
  const float* pd = dist.data_ptr<float>();
  int64_t* pi = idx.data_ptr<int64_t>();
  bool* pp = piv.data_ptr<bool>();
  const int64_t half = window / 2;

  at::parallel_for(0, B * inner, rows_grain(T), [&](int64_t c0, int64_t c1) {
    std::vector<float> d(T);
    std::vector<char> peak(T);
    std::vector<int64_t> order(T);
    for (int64_t col = c0; col < c1; ++col) {
      const int64_t b = col / inner, n = col % inner;
      for (int64_t t = 0; t < T; ++t) d[t] = rank_value(pd[(b * T + t) * inner + n]);
      auto get = [&d](int64_t j) { return d[j]; };
      for (int64_t t = 0; t < T; ++t) peak[t] = is_peak(get, T, t, half);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t i, int64_t j) {
        if (peak[i] != peak[j]) return peak[i] > peak[j];
        if (d[i] != d[j]) return d[i] > d[j];
        return i < j;
      });
      std::sort(order.begin(), order.begin() + k);
      for (int64_t r = 0; r < k; ++r) {
        pi[(b * k + r) * inner + n] = order[r];
        pp[(b * k + r) * inner + n] = peak[order[r]];
      }
    }
  });
  return {idx, piv};
}

TORCH_LIBRARY_IMPL(retake, CPU, m) { m.impl("dpselect", &dpselect_cpu); }

}  // namespace retake
