// Launcher of csrc/cuda/nms_select.cu (plain CUDA interface for the torch glue).
#pragma once
#include "cuda/common.h"

namespace retake {
namespace cuda {

// scores: contiguous [B, N] of `dtype`; out: int64 [B, k]; state: B*N bytes of scratch;
// nan_flag: one int on the device, set to 1 when a row contains NaN (that row's output
// is then left unwritten). radius is the resolved radius (>= 0). Requires N, B < 2^31.
cudaError_t nms_select_launch(const void* scores, DType dtype, int64_t B, int64_t N, int64_t k, int64_t radius,
                              int64_t* out, uint8_t* state, int* nan_flag, cudaStream_t stream);

}  // namespace cuda
}  // namespace retake
