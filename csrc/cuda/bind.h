// Helpers for the torch glue of the CUDA kernels (compiled only in CUDA builds).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/common.h"

namespace retake {

inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat32;
  }
}

// frame_distance on CUDA for checked feats; shared by the frame_distance and dpselect glue.
at::Tensor frame_distance_cuda_impl(const at::Tensor& feats, bool sync, double first, bool check_finite,
                                    const char* op);

}  // namespace retake
