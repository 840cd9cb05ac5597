// Launchers of csrc/cuda/dpselect.cu (plain CUDA interface for the torch glue).
#pragma once
#include "cuda/common.h"

namespace retake {
namespace cuda {

// dist: fp32 contiguous [outer, T, inner]. Writes peaks (bool) and a unique int64 sort key per
// element, both [outer, T, inner]: a larger key ranks first under dpselect's rule
// (peak, then larger distance, then lower index). Requires T <= 2^30.
cudaError_t dpselect_keys_launch(const float* dist, int64_t outer, int64_t T, int64_t inner, int64_t window,
                                 bool* peaks, int64_t* keys, cudaStream_t stream);

}  // namespace cuda
}  // namespace retake
