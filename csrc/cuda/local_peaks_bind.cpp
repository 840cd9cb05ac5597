// Torch glue for the local_peaks CUDA kernel (csrc/cuda/local_peaks.cu).
#include <torch/library.h>

#include "checks.h"
#include "cuda/bind.h"
#include "cuda/local_peaks.h"

namespace retake {

at::Tensor local_peaks_cuda(const at::Tensor& dist, int64_t window) {
  check_local_peaks_args(dist, window);
  const c10::cuda::CUDAGuard guard(dist.device());
  const at::Tensor x = dist.contiguous();
  at::Tensor out = at::empty(dist.sizes(), x.options().dtype(at::kBool));
  const int64_t T = x.size(-1);
  const int64_t rows = T == 0 ? 0 : x.numel() / T;
  C10_CUDA_CHECK(cuda::local_peaks_launch(x.data_ptr(), cuda_dtype(x), rows, T, 1, window, out.data_ptr<bool>(),
                                          c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(retake, CUDA, m) { m.impl("local_peaks", &local_peaks_cuda); }

}  // namespace retake
