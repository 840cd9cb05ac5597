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

// Argument checks of the DPSelect ops, shared by their CPU kernels and CUDA glue.
inline void check_feats(const char* op, const at::Tensor& feats) {
  check_rank(op, "feats", feats, 4, "[B, T, N, C]");
  check_float(op, "feats", feats);
  // The patch mean (sync) of zero patches has no value.
  TORCH_CHECK_VALUE(feats.size(2) >= 1, op, ": feats must have at least one patch (N >= 1), got shape ",
                    shape_str(feats));
}

inline void check_local_peaks_args(const at::Tensor& dist, int64_t window) {
  constexpr const char* op = "local_peaks";
  TORCH_CHECK_VALUE(dist.dim() >= 1, op, ": dist must have at least 1 dimension [..., T], got shape ",
                    shape_str(dist));
  check_float(op, "dist", dist);
  check_window(op, window);
}

inline void check_dpselect_args(const at::Tensor& feats, int64_t num_frames, int64_t window) {
  constexpr const char* op = "dpselect";
  check_feats(op, feats);
  const int64_t T = feats.size(1);
  TORCH_CHECK_VALUE(T <= (int64_t(1) << 30), op, ": feats has T=", T, " frames, at most ", int64_t(1) << 30,
                    " are supported");
  TORCH_CHECK_VALUE(num_frames >= 0 && num_frames <= T, op, ": num_frames must be in [0, T=", T, "], got ",
                    num_frames);
  check_window(op, window);
}

}  // namespace retake
