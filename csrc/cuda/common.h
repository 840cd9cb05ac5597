// Types shared by the CUDA kernels (plain CUDA, no torch) and their torch glue.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace retake {
namespace cuda {

// Element type of a floating-point input, as the glue maps it from the tensor's dtype.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cuda
}  // namespace retake
