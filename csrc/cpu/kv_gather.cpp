// kv_gather CPU kernels: out_k[b,h,i,:] = k[b,h,idx[b,(h),i],:], the same for v.
// k, v [B,H,L,D] fp16/bf16/fp32 (rows with unit stride along D are read in place, other
// layouts are made contiguous); idx int64 [B,L'] shared by every head or [B,H,L'] per head.
// Rows are copied as raw bytes (memcpy of D * element size), tasks own runs of output rows.
// Indices are checked in one pass before any copy; unchecked out-of-range rows become zeros.
// kv_gather_out writes caller-given buffers in place when their rows are unit-stride and
// they do not overlap an input, otherwise through a temporary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "checks.h"

namespace retake {
namespace {

void check_kv_gather(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx) {
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

void check_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& k, int64_t L_out) {
  const int64_t B = k.size(0), H = k.size(1), D = k.size(3);
  TORCH_CHECK_VALUE(out.dim() == 4 && out.size(0) == B && out.size(1) == H && out.size(2) == L_out &&
                        out.size(3) == D,
                    op, ": ", name, " must have shape [", B, ", ", H, ", ", L_out, ", ", D, "], got ", shape_str(out));
  TORCH_CHECK_VALUE(out.scalar_type() == k.scalar_type(), op, ": ", name, " must have the dtype of k (",
                    dtype_name(k.scalar_type()), "), got ", dtype_name(out.scalar_type()));
}

void check_index_values(const char* op, const at::Tensor& idx, int64_t L) {
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

// Whether the address ranges spanned by a and b intersect (conservative for strided views;
// at::get_overlap_status gives up on non-dense tensors such as cache slices).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return (last + 1) * static_cast<int64_t>(t.element_size());
  };
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr()), pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  return pa < pb + span(b) && pb < pa + span(a);
}

// Copies the rows into out_k/out_v, whose rows must be unit-stride and disjoint from the inputs.
void gather_rows(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& idx_in, at::Tensor& out_k,
                 at::Tensor& out_v, bool check_bounds, const char* op) {
  const int64_t B = k_in.size(0), H = k_in.size(1), L = k_in.size(2), D = k_in.size(3);
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  if (check_bounds) check_index_values(op, idx, L);
  const int64_t L_out = idx.size(-1);
  if (B * H * L_out == 0) return;
  const bool per_head = idx.dim() == 3;
  const int64_t es = k.element_size(), row_bytes = D * es;
  const char* pk = static_cast<const char*>(k.data_ptr());
  const char* pv = static_cast<const char*>(v.data_ptr());
  char* pok = static_cast<char*>(out_k.data_ptr());
  char* pov = static_cast<char*>(out_v.data_ptr());
  const int64_t* pi = idx.data_ptr<int64_t>();
  // ~64 KiB of rows per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 2 * row_bytes));
  at::parallel_for(0, B * H * L_out, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % L_out, bh = r / L_out, b = bh / H, h = bh % H;
      const int64_t j = per_head ? pi[r] : pi[b * L_out + i];
      char* dk = pok + (b * out_k.stride(0) + h * out_k.stride(1) + i * out_k.stride(2)) * es;
      char* dv = pov + (b * out_v.stride(0) + h * out_v.stride(1) + i * out_v.stride(2)) * es;
      if (j < 0 || j >= L) {
        std::memset(dk, 0, row_bytes);
        std::memset(dv, 0, row_bytes);
        continue;
      }
      std::memcpy(dk, pk + (b * k.stride(0) + h * k.stride(1) + j * k.stride(2)) * es, row_bytes);
      std::memcpy(dv, pv + (b * v.stride(0) + h * v.stride(1) + j * v.stride(2)) * es, row_bytes);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kv_gather_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                                 bool check_bounds) {
  constexpr const char* op = "kv_gather";
  check_kv_gather(op, k, v, idx);
  at::Tensor out_k = at::empty({k.size(0), k.size(1), idx.size(-1), k.size(3)}, k.options());
  at::Tensor out_v = at::empty_like(out_k);
  gather_rows(k, v, idx, out_k, out_v, check_bounds, op);
  return {out_k, out_v};
}

void kv_gather_out_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx, at::Tensor out_k,
                       at::Tensor out_v, bool check_bounds) {
  constexpr const char* op = "kv_gather_out";
  check_kv_gather(op, k, v, idx);
  check_out(op, "out_k", out_k, k, idx.size(-1));
  check_out(op, "out_v", out_v, k, idx.size(-1));
  TORCH_CHECK_VALUE(out_k.device() == k.device() && out_v.device() == k.device(), op,
                    ": all tensors must be on one device, got k on ", k.device().str(), ", out_k on ",
                    out_k.device().str(), ", out_v on ", out_v.device().str());
  TORCH_CHECK_VALUE(!overlaps(out_k, out_v), op, ": out_k and out_v must not overlap in memory");
  auto direct = [&](const at::Tensor& out) {
    return out.stride(3) == 1 && !overlaps(out, k) && !overlaps(out, v) && !overlaps(out, idx);
  };
  at::Tensor tk = direct(out_k) ? out_k : at::empty(out_k.sizes(), out_k.options());
  at::Tensor tv = direct(out_v) ? out_v : at::empty(out_v.sizes(), out_v.options());
  gather_rows(k, v, idx, tk, tv, check_bounds, op);
  if (!tk.is_same(out_k)) out_k.copy_(tk);
  if (!tv.is_same(out_v)) out_v.copy_(tv);
}

TORCH_LIBRARY_IMPL(retake, CPU, m) {
  m.impl("kv_gather", &kv_gather_cpu);
  m.impl("kv_gather_out", &kv_gather_out_cpu);
}

}  // namespace retake
