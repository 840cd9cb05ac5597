// Torch glue for the nms_select CUDA kernel: checks (same messages as the CPU kernel),
// fp32 contiguous scores, scratch, the launch on the current stream, and one read
// back of the NaN flag.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/nms_select.h"

namespace retake {

at::Tensor nms_select_cuda_op(const at::Tensor& scores, int64_t k, int64_t radius) {
  constexpr const char* op = "nms_select";
  check_rank(op, "scores", scores, 2, "[B, N]");
  check_float(op, "scores", scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  constexpr int64_t max_frames = (int64_t(1) << 31) - 1;
  TORCH_CHECK_VALUE(N <= max_frames, op, ": scores has N=", N, " frames, at most ", max_frames,
                    " are supported");
  TORCH_CHECK_VALUE(k >= 0 && k <= N, op, ": k must be in [0, N=", N, "], got ", k);
  TORCH_CHECK_VALUE(radius >= -1, op, ": radius must be >= 0, or -1 for N // (4k), got ", radius);
  TORCH_CHECK_VALUE(B <= int64_t(0x7fffffff), op, ": scores has B=", B, " rows, at most 2147483647 are supported");
  const int64_t r = radius != -1 ? radius : (k > 0 ? N / (4 * k) : 0);

  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  at::Tensor state = at::empty({B, N}, scores.options().dtype(at::kByte));
  at::Tensor nan_flag = at::zeros({1}, scores.options().dtype(at::kInt));
  const cudaError_t err = nms_select_cuda(x.data_ptr<float>(), out.data_ptr<int64_t>(), state.data_ptr<uint8_t>(),
                                          nan_flag.data_ptr<int>(), B, N, k, r,
                                          c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  TORCH_CHECK_VALUE(nan_flag.item<int>() == 0, op,
                    ": scores contains NaN, expected finite or +-inf scores (use -inf for unwanted frames)");
  return out;
}

TORCH_LIBRARY_IMPL(retake, CUDA, m) { m.impl("nms_select", &nms_select_cuda_op); }

}  // namespace retake
