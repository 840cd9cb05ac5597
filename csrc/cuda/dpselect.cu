// dpselect CUDA ranking kernel: peaks and sort keys from fp32 distances [outer, T, inner].
//   key = peak << 62 | ordered(d) << 30 | (2^30 - 1 - t)
// ordered(d) = ordered_bits(rank_value(d)) (csrc/ranking.h: NaN as -inf, -0 as +0, order
// preserved), so sorting keys descending is exactly (peak desc, distance desc, index asc) and
// every key is unique: the glue's top-k is deterministic and agrees with the CPU kernel, ties
// included.
#include "cuda/common.cuh"
#include "cuda/dpselect.h"
#include "ranking.h"

namespace retake {
namespace cuda {
namespace {

__global__ void dpselect_keys_kernel(const float* __restrict__ dist, int64_t outer, int64_t len, int64_t inner,
                                     int64_t half, bool* __restrict__ peaks, int64_t* __restrict__ keys) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= outer * len * inner) return;
  const int64_t i = e % inner, t = (e / inner) % len, o = e / (inner * len);
  const float* column = dist + o * len * inner + i;
  const bool peak = is_peak([=](int64_t j) { return rank_value(column[j * inner]); }, len, t, half);
  peaks[e] = peak;
  const int64_t ordered = ordered_bits(rank_value(dist[e]));
  keys[e] = (static_cast<int64_t>(peak) << 62) | (ordered << 30) | ((int64_t(1) << 30) - 1 - t);
}

}  // namespace

cudaError_t dpselect_keys_launch(const float* dist, int64_t outer, int64_t T, int64_t inner, int64_t window,
                                 bool* peaks, int64_t* keys, cudaStream_t stream) {
  const int64_t total = outer * T * inner;
  if (total == 0) return cudaSuccess;
  dpselect_keys_kernel<<<(total + 255) / 256, 256, 0, stream>>>(dist, outer, T, inner, window / 2, peaks, keys);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retake
