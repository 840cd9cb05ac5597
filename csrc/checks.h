// Every argument check of the C++ CPU kernels and the CUDA glue, written once. Messages
// match retake_ops/checks.py word for word, so an error reads the same whichever kernel the
// dispatcher picked. TORCH_CHECK_VALUE raises ValueError.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace retake {

// ---------------------------------------------------------------- generic

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    // Python's name (torch.int8, torch.complex64, ...), not c10's (Char, ComplexFloat).
    default: return "torch." + std::string(c10::getDtypeNames(t).first);
  }
}

inline std::string list_str(at::IntArrayRef values) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < values.size(); ++i) s << (i ? ", " : "") << values[i];
  s << "]";
  return s.str();
}

inline std::string shape_str(const at::Tensor& t) { return list_str(t.sizes()); }

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

// Whether the address ranges spanned by a and b intersect (conservative for strided views;
// at::get_overlap_status gives up on non-dense tensors such as cache slices).
inline bool memory_overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return (last + 1) * static_cast<int64_t>(t.element_size());
  };
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr()), pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  return pa < pb + span(b) && pb < pa + span(a);
}

// Whether two elements of t can share an address: dims sorted by stride, each stride must exceed
// the farthest offset the smaller dims reach. Exact for stride 0 (expanded) and for the layouts
// of slices, transposes and permutes; conservative for exotic interleavings.
inline bool may_overlap_itself(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims that repeat
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += (size - 1) * stride;
  }
  return false;
}

inline void check_no_self_overlap(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() == 0 || !may_overlap_itself(t), op, ": ", name,
                    " must not overlap itself (an expanded or overlapping view would write several elements to "
                    "one address), got shape ", shape_str(t), " with strides ", list_str(t.strides()));
}

// ---------------------------------------------------------------- DPSelect ops

inline void check_feats(const char* op, const at::Tensor& feats) {
  check_rank(op, "feats", feats, 4, "[B, T, N, C]");
  check_float(op, "feats", feats);
  // The patch mean (sync) of zero patches has no value.
  TORCH_CHECK_VALUE(feats.size(2) >= 1, op, ": feats must have at least one patch (N >= 1), got shape ",
                    shape_str(feats));
}

inline void check_frame_distance_args(const at::Tensor& feats, double first) {
  constexpr const char* op = "frame_distance";
  check_feats(op, feats);
  // The distances are fp32: a finite `first` beyond its range would silently become +-inf.
  TORCH_CHECK_VALUE(!std::isfinite(first) || std::fabs(first) <= std::numeric_limits<float>::max(), op,
                    ": first must be within the float32 range (|first| <= 3.4028235e+38) or +-inf, got ", first);
}

inline void check_features_finite(const char* op, bool nonfinite) {
  TORCH_CHECK_VALUE(!nonfinite, op,
                    ": feats contains NaN or Inf; pass check_finite=False to skip this check "
                    "(non-finite distances then rank lowest)");
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

// ---------------------------------------------------------------- nms_select

constexpr int64_t kNmsMaxFrames = (int64_t(1) << 31) - 1;  // frames are indexed with int on CUDA

// Checks the arguments; returns the suppression radius, N // (4k) for radius == -1 (0 when k == 0).
inline int64_t check_nms_select_args(const at::Tensor& scores, int64_t k, int64_t radius) {
  constexpr const char* op = "nms_select";
  check_rank(op, "scores", scores, 2, "[B, N]");
  check_float(op, "scores", scores);
  const int64_t N = scores.size(1);
  TORCH_CHECK_VALUE(N <= kNmsMaxFrames, op, ": scores has N=", N, " frames, at most ", kNmsMaxFrames,
                    " are supported");
  TORCH_CHECK_VALUE(k >= 0 && k <= N, op, ": k must be in [0, N=", N, "], got ", k);
  TORCH_CHECK_VALUE(radius >= -1, op, ": radius must be >= 0, or -1 for N // (4k), got ", radius);
  return radius != -1 ? radius : (k > 0 ? N / (4 * k) : 0);
}

// The CUDA kernel runs one block per row.
inline void check_nms_select_rows_cuda(const at::Tensor& scores) {
  TORCH_CHECK_VALUE(scores.size(0) <= kNmsMaxFrames, "nms_select: scores has B=", scores.size(0),
                    " rows, at most ", kNmsMaxFrames, " are supported on CUDA");
}

inline void check_scores_without_nan(bool has_nan) {
  TORCH_CHECK_VALUE(!has_nan,
                    "nms_select: scores contains NaN, expected finite or +-inf scores (use -inf for unwanted frames)");
}

// ---------------------------------------------------------------- attn_scores

constexpr int64_t kAttnMaxHeadDim = 256;

// A float as Python's repr writes it (1.0, -100.0, 0.0001, 1e-05, 1e+16, nan, -inf): the shortest
// digits that read back as x, in fixed notation for decimal exponents in [-4, 16), so messages
// match checks.py.
inline std::string python_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[40];
  // Shortest round-trip digits, the nearest among them: Python's repr. (Rounding x to ever more
  // digits with %.*e is not the same: next to a power of two the nearest n-digit string can
  // miss while another one reads back, e.g. -2.0**-1017 is -7.120236347223045e-307.)
  *std::to_chars(buf, buf + sizeof buf - 1, x, std::chars_format::scientific).ptr = '\0';
  std::string text(buf), sign;
  if (text[0] == '-') {
    sign = "-";
    text.erase(0, 1);
  }
  const size_t e = text.find('e');
  const int exponent = std::stoi(text.substr(e + 1));
  std::string digits = text.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  if (exponent < -4 || exponent >= 16) {
    std::string mantissa = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    std::snprintf(buf, sizeof buf, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return sign + mantissa + buf;
  }
  if (exponent < 0) return sign + "0." + std::string(-exponent - 1, '0') + digits;
  if (static_cast<int>(digits.size()) <= exponent + 1)
    return sign + digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  return sign + digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
}

inline void check_attn_scores_args(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale) {
  constexpr const char* op = "attn_scores";
  check_rank(op, "q", q, 4, "[B, Hq, Lq, D]");
  check_rank(op, "k", k, 4, "[B, Hkv, Lk, D]");
  check_float(op, "q", q);
  check_float(op, "k", k);
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type(), op, ": q and k must have the same dtype, got q ",
                    dtype_name(q.scalar_type()), " and k ", dtype_name(k.scalar_type()));
  TORCH_CHECK_VALUE(q.device() == k.device(), op, ": all tensors must be on one device, got q on ", q.device().str(),
                    ", k on ", k.device().str());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0), op, ": q and k must have the same batch size B, got q ", shape_str(q),
                    " and k ", shape_str(k));
  TORCH_CHECK_VALUE(q.size(3) == k.size(3), op, ": q and k must have the same head dim D, got q ", shape_str(q),
                    " and k ", shape_str(k));
  const int64_t D = q.size(3), Hq = q.size(1), Hkv = k.size(1);
  TORCH_CHECK_VALUE(D >= 1 && D <= kAttnMaxHeadDim, op, ": head dim D must be in [1, ", kAttnMaxHeadDim,
                    "], got D=", D);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, op, ": q has Hq=", Hq, " heads and k has Hkv=", Hkv,
                    ": Hq must be a positive multiple of Hkv (Hq % Hkv == 0)");
  TORCH_CHECK_VALUE(!scale || (std::isfinite(*scale) && *scale > 0), op,
                    ": scale must be a finite number > 0 (or None for D**-0.5), got ",
                    scale ? python_float(*scale) : "None");
}

// ---------------------------------------------------------------- kv_gather

inline void check_kv_gather_args(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx) {
  check_rank(op, "k", k, 4, "[B, H, L, D]");
  check_rank(op, "v", v, 4, "[B, H, L, D]");
  check_float(op, "k", k);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v must have the shape of k ", shape_str(k), ", got ",
                    shape_str(v));
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), op, ": v must have the dtype of k (",
                    dtype_name(k.scalar_type()), "), got ", dtype_name(v.scalar_type()));
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, op, ": idx must be torch.int64, got ",
                    dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() == 2 || idx.dim() == 3, op,
                    ": idx must be a 2-D tensor [B, L'] or a 3-D tensor [B, H, L'], got shape ", shape_str(idx));
  const int64_t B = k.size(0), H = k.size(1);
  TORCH_CHECK_VALUE(idx.size(0) == B && (idx.dim() == 2 || idx.size(1) == H), op, ": idx must have shape [B=", B,
                    ", L'] or [B=", B, ", H=", H, ", L'], got ", shape_str(idx));
  TORCH_CHECK_VALUE(v.device() == k.device() && idx.device() == k.device(), op,
                    ": all tensors must be on one device, got k on ", k.device().str(), ", v on ", v.device().str(),
                    ", idx on ", idx.device().str());
}

inline void check_gather_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& k,
                             int64_t L_out) {
  const int64_t B = k.size(0), H = k.size(1), D = k.size(3);
  TORCH_CHECK_VALUE(out.dim() == 4 && out.size(0) == B && out.size(1) == H && out.size(2) == L_out &&
                        out.size(3) == D,
                    op, ": ", name, " must have shape [", B, ", ", H, ", ", L_out, ", ", D, "], got ", shape_str(out));
  TORCH_CHECK_VALUE(out.scalar_type() == k.scalar_type(), op, ": ", name, " must have the dtype of k (",
                    dtype_name(k.scalar_type()), "), got ", dtype_name(out.scalar_type()));
}

// The out buffers may overlap k and v (the kernel then goes through a temporary), but not each
// other and not themselves.
inline void check_kv_gather_out_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                     const at::Tensor& out_k, const at::Tensor& out_v) {
  constexpr const char* op = "kv_gather_out";
  check_kv_gather_args(op, k, v, idx);
  check_gather_out(op, "out_k", out_k, k, idx.size(-1));
  check_gather_out(op, "out_v", out_v, k, idx.size(-1));
  TORCH_CHECK_VALUE(out_k.device() == k.device() && out_v.device() == k.device(), op,
                    ": all tensors must be on one device, got k on ", k.device().str(), ", out_k on ",
                    out_k.device().str(), ", out_v on ", out_v.device().str());
  check_no_self_overlap(op, "out_k", out_k);
  check_no_self_overlap(op, "out_v", out_v);
  TORCH_CHECK_VALUE(!memory_overlaps(out_k, out_v), op, ": out_k and out_v must not overlap in memory");
}

// idx: contiguous int64 on the CPU. One pass for the min and the max, before any row is copied.
inline void check_index_values(const char* op, const at::Tensor& idx, int64_t L) {
  const int64_t n = idx.numel();
  if (n == 0) return;
  const int64_t* p = idx.data_ptr<int64_t>();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK_VALUE(lo >= 0 && hi < L, op, ": idx values must be in [0, L=", L, "), got min ", lo, ", max ", hi);
}

}  // namespace retake
