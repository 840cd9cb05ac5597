// local_peaks CUDA kernel: x [outer, T, inner] (fp32/fp16/bf16, contiguous) -> bool, same layout.
// Element (o, t, i) is a peak iff x[o, t, i] is the first maximum of x[o, t-w/2 .. t+w/2, i]
// clipped to [0, T); NaN counts as -inf. One thread per element.
#include "cuda/common.cuh"
#include "cuda/local_peaks.h"
#include "ranking.h"

namespace retake {
namespace cuda {
namespace {

template <typename T>
__global__ void local_peaks_kernel(const T* __restrict__ x, int64_t outer, int64_t len, int64_t inner, int64_t half,
                                   bool* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= outer * len * inner) return;
  const int64_t i = e % inner, t = (e / inner) % len, o = e / (inner * len);
  const T* column = x + o * len * inner + i;
  out[e] = is_peak([=](int64_t j) { return rank_value(to_float(column[j * inner])); }, len, t, half);
}

}  // namespace

cudaError_t local_peaks_launch(const void* x, DType dtype, int64_t outer, int64_t T, int64_t inner,
                               int64_t window, bool* out, cudaStream_t stream) {
  const int64_t total = outer * T * inner;
  if (total == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    local_peaks_kernel<<<(total + 255) / 256, 256, 0, stream>>>(static_cast<const scalar_t*>(x), outer, T, inner,
                                                                window / 2, out);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retake
