// Argument checks shared by the C++ CPU kernels and the CUDA glue. Messages
// match retake_ops/ops/_checks.py word for word, so an error reads the same
// whichever kernel the dispatcher picked. TORCH_CHECK_VALUE raises ValueError.
#pragma once
#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace retake {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "]";
  return s.str();
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  auto d = t.scalar_type();
  TORCH_CHECK_VALUE(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
                    " must be float16, bfloat16 or float32, got ", dtype_name(d));
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor ", layout,
                    ", got shape ", shape_str(t));
}

inline void check_window(const char* op, int64_t window) {
  TORCH_CHECK_VALUE(window >= 1 && window % 2 == 1, op, ": window must be odd and >= 1, got ", window);
}

}  // namespace retake
