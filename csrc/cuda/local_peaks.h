// Launchers of csrc/cuda/local_peaks.cu (plain CUDA interface for the torch glue).
#pragma once
#include "cuda/common.h"

namespace retake {
namespace cuda {

// x: contiguous [outer, T, inner] of `dtype`; peaks along T into out (bool, same layout).
cudaError_t local_peaks_launch(const void* x, DType dtype, int64_t outer, int64_t T, int64_t inner,
                               int64_t window, bool* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace retake
