// kv_gather CPU kernels: out_k[b,h,i,:] = k[b,h,idx[b,(h),i],:], the same for v.
// k, v [B,H,L,D] fp16/bf16/fp32 (rows with unit stride along D are read in place, other
// layouts are made contiguous); idx int64 [B,L'] shared by every head or [B,H,L'] per head.
// Rows are copied as raw bytes (memcpy of D * element size), tasks own runs of output rows.
// Indices are checked in one pass before any copy; unchecked out-of-range rows become zeros.
// kv_gather_out writes caller-given buffers (checked free of self-overlap) in place when their
// rows are unit-stride and they do not overlap an input, otherwise through a temporary: rows
// copied in place could overwrite a source row that a later output row still reads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "checks.h"

namespace retake {
namespace {

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
  // Byte strides, [b, h, row] for each of k, v, out_k, out_v.
  const int64_t st[4][3] = {{k.stride(0) * es, k.stride(1) * es, k.stride(2) * es},
                            {v.stride(0) * es, v.stride(1) * es, v.stride(2) * es},
                            {out_k.stride(0) * es, out_k.stride(1) * es, out_k.stride(2) * es},
                            {out_v.stride(0) * es, out_v.stride(1) * es, out_v.stride(2) * es}};
  // ~64 KiB of rows per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 2 * row_bytes));
  at::parallel_for(0, B * H * L_out, grain, [&](int64_t r0, int64_t r1) {
    // A task's rows are runs of whole or partial (b, h) pairs, addressed once per pair: the four
    // integer divisions a flat row index needs cost as much as copying a 256-byte row.
    for (int64_t bh = r0 / L_out, i = r0 % L_out, r = r0; r < r1; ++bh, i = 0) {
      const int64_t b = bh / H, h = bh % H, i_end = std::min(L_out, i + (r1 - r));
      r += i_end - i;
      const char* sk = pk + b * st[0][0] + h * st[0][1];
      const char* sv = pv + b * st[1][0] + h * st[1][1];
      char* dk = pok + b * st[2][0] + h * st[2][1];
      char* dv = pov + b * st[3][0] + h * st[3][1];
      const int64_t* rows = pi + (per_head ? bh : b) * L_out;
      for (; i < i_end; ++i) {
        const int64_t j = rows[i];
        if (j < 0 || j >= L) {
          std::memset(dk + i * st[2][2], 0, row_bytes);
          std::memset(dv + i * st[3][2], 0, row_bytes);
          continue;
        }
        std::memcpy(dk + i * st[2][2], sk + j * st[0][2], row_bytes);
        std::memcpy(dv + i * st[3][2], sv + j * st[1][2], row_bytes);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kv_gather_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                                 bool check_bounds) {
  constexpr const char* op = "kv_gather";
  check_kv_gather_args(op, k, v, idx);
  at::Tensor out_k = at::empty({k.size(0), k.size(1), idx.size(-1), k.size(3)}, k.options());
  at::Tensor out_v = at::empty_like(out_k);
  gather_rows(k, v, idx, out_k, out_v, check_bounds, op);
  return {out_k, out_v};
}

void kv_gather_out_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx, at::Tensor out_k,
                       at::Tensor out_v, bool check_bounds) {
  constexpr const char* op = "kv_gather_out";
  check_kv_gather_out_args(k, v, idx, out_k, out_v);
  auto direct = [&](const at::Tensor& out) {
    return out.stride(3) == 1 && !memory_overlaps(out, k) && !memory_overlaps(out, v) && !memory_overlaps(out, idx);
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
