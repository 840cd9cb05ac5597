// Torch glue for dpselect on CUDA: distances and sort keys from the CUDA kernels, then
// torch's top-k over unique keys (deterministic) and an ascending sort of the winners.
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/bind.h"
#include "cuda/dpselect.h"

namespace retake {

std::tuple<at::Tensor, at::Tensor> dpselect_cuda(const at::Tensor& feats, int64_t num_frames, int64_t window,
                                                 bool sync, bool check_finite) {
  check_dpselect_args(feats, num_frames, window);
  const int64_t B = feats.size(0), T = feats.size(1), N = feats.size(2);
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t inner = sync ? 1 : N;
  const at::Tensor dist = frame_distance_cuda_impl(feats, sync, 1.0, check_finite, "dpselect");
  at::Tensor peaks = at::empty(dist.sizes(), dist.options().dtype(at::kBool));
  at::Tensor keys = at::empty(dist.sizes(), dist.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::dpselect_keys_launch(dist.data_ptr<float>(), B, T, inner, window, peaks.data_ptr<bool>(),
                                            keys.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  if (num_frames == 0) {
    auto shape = sync ? at::IntArrayRef{B, 0} : at::IntArrayRef{B, 0, N};
    return {at::empty(shape, keys.options()), at::empty(shape, peaks.options())};
  }
  const at::Tensor top = std::get<1>(at::topk(keys, num_frames, /*dim=*/1, /*largest=*/true, /*sorted=*/false));
  at::Tensor idx = std::get<0>(at::sort(top, /*dim=*/1));
  at::Tensor is_pivot = peaks.gather(1, idx);
  return {idx, is_pivot};
}

TORCH_LIBRARY_IMPL(retake, CUDA, m) { m.impl("dpselect", &dpselect_cuda); }

}  // namespace retake
