// Torch glue for the frame_distance CUDA kernel (csrc/cuda/frame_distance.cu).
#include <torch/library.h>

#include "checks.h"
#include "cuda/bind.h"
#include "cuda/frame_distance.h"

namespace retake {

at::Tensor frame_distance_cuda_impl(const at::Tensor& feats, bool sync, double first, bool check_finite,
                                    const char* op) {
  const c10::cuda::CUDAGuard guard(feats.device());
  const at::Tensor x = feats.contiguous();
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), C = x.size(3);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor d = at::empty({B, T, N}, f32);
  at::Tensor out = sync ? at::empty({B, T}, f32) : d;
  at::Tensor flag;
  if (check_finite) flag = at::zeros({1}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::frame_distance_launch(x.data_ptr(), cuda_dtype(x), B, T, N, C, static_cast<float>(first),
                                             d.data_ptr<float>(), sync ? out.data_ptr<float>() : nullptr,
                                             check_finite ? flag.data_ptr<int>() : nullptr,
                                             c10::cuda::getCurrentCUDAStream()));
  if (check_finite) check_features_finite(op, flag.item<int>() != 0);
  return out;
}

at::Tensor frame_distance_cuda(const at::Tensor& feats, bool sync, double first, bool check_finite) {
  check_frame_distance_args(feats, first);
  return frame_distance_cuda_impl(feats, sync, first, check_finite, "frame_distance");
}

TORCH_LIBRARY_IMPL(retake, CUDA, m) { m.impl("frame_distance", &frame_distance_cuda); }

}  // namespace retake
