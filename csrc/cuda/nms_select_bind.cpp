// Torch glue for nms_select on CUDA: checks (same messages as the CPU kernel), a contiguous
// view of the scores, scratch, the launch on the current stream, and one read back of the
// NaN flag after it.
#include <torch/library.h>

#include "checks.h"
#include "cuda/bind.h"
#include "cuda/nms_select.h"

namespace retake {

at::Tensor nms_select_cuda(const at::Tensor& scores, int64_t k, int64_t radius) {
  constexpr const char* op = "nms_select";
  constexpr int64_t max_frames = (int64_t(1) << 31) - 1;
  check_rank(op, "scores", scores, 2, "[B, N]");
  check_float(op, "scores", scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(N <= max_frames, op, ": scores has N=", N, " frames, at most ", max_frames, " are supported");
  TORCH_CHECK_VALUE(k >= 0 && k <= N, op, ": k must be in [0, N=", N, "], got ", k);
  TORCH_CHECK_VALUE(radius >= -1, op, ": radius must be >= 0, or -1 for N // (4k), got ", radius);
  TORCH_CHECK_VALUE(B <= max_frames, op, ": scores has B=", B, " rows, at most ", max_frames,
                    " are supported on CUDA");
  const int64_t r = radius != -1 ? radius : (k > 0 ? N / (4 * k) : 0);

  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  at::Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  at::Tensor state = at::empty({B, N}, scores.options().dtype(at::kByte));
  at::Tensor nan_flag = at::zeros({1}, scores.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::nms_select_launch(x.data_ptr(), cuda_dtype(x), B, N, k, r, out.data_ptr<int64_t>(),
                                         state.data_ptr<uint8_t>(), nan_flag.data_ptr<int>(),
                                         c10::cuda::getCurrentCUDAStream()));
  TORCH_CHECK_VALUE(nan_flag.item<int>() == 0, op,
                    ": scores contains NaN, expected finite or +-inf scores (use -inf for unwanted frames)");
  return out;
}

TORCH_LIBRARY_IMPL(retake, CUDA, m) { m.impl("nms_select", &nms_select_cuda); }

}  // namespace retake
