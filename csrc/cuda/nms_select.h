// Launcher of the nms_select CUDA kernel (csrc/cuda/nms_select.cu); plain CUDA types only.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace retake {

// scores: fp32 [B, N] contiguous; out: int64 [B, k]; state: B*N bytes of scratch;
// nan_flag: one int on the device, set to 1 when a row contains NaN (that row's
// output is then unspecified). radius is the resolved radius (>= 0). N < 2^31.
cudaError_t nms_select_cuda(const float* scores, int64_t* out, uint8_t* state, int* nan_flag, int64_t B,
                            int64_t N, int64_t k, int64_t radius, cudaStream_t stream);

}  // namespace retake
