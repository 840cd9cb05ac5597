// Torch glue for nms_select on CUDA: checks (csrc/checks.h, shared with the CPU kernel), a
// contiguous view of the scores, scratch, the launch on the current stream, and one read back
// of the NaN flag after it.
#include <torch/library.h>

#include "checks.h"
#include "cuda/bind.h"
#include "cuda/nms_select.h"

namespace retake {

at::Tensor nms_select_cuda(const at::Tensor& scores, int64_t k, int64_t radius) {
  const int64_t r = check_nms_select_args(scores, k, radius);
  check_nms_select_rows_cuda(scores);
  const int64_t B = scores.size(0), N = scores.size(1);

  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  at::Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  at::Tensor state = at::empty({B, N}, scores.options().dtype(at::kByte));
  at::Tensor nan_flag = at::zeros({1}, scores.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::nms_select_launch(x.data_ptr(), cuda_dtype(x), B, N, k, r, out.data_ptr<int64_t>(),
                                         state.data_ptr<uint8_t>(), nan_flag.data_ptr<int>(),
                                         c10::cuda::getCurrentCUDAStream()));
  check_scores_without_nan(nan_flag.item<int>() != 0);
  return out;
}

TORCH_LIBRARY_IMPL(retake, CUDA, m) { m.impl("nms_select", &nms_select_cuda); }

}  // namespace retake
