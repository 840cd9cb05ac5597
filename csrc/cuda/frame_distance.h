// Launchers of csrc/cuda/frame_distance.cu (plain CUDA interface for the torch glue).
#pragma once
#include "cuda/common.h"

namespace retake {
namespace cuda {

// feats: contiguous [B,T,N,C] of `dtype`. Writes fp32 distances d[B,T,N] (d[:,0,:] = first)
// and, when `out_sync` is not null, their mean over N into out_sync[B,T].
// When nonfinite is not null, sets *nonfinite to 1 if any feature is NaN or Inf.
cudaError_t frame_distance_launch(const void* feats, DType dtype, int64_t B, int64_t T, int64_t N, int64_t C,
                                  float first, float* d, float* out_sync, int* nonfinite, cudaStream_t stream);

}  // namespace cuda
}  // namespace retake
