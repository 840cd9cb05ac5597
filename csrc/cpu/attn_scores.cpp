// attn_scores CPU kernel.
//   out[b,h,j] = sum over the G = Hq/Hkv query heads g of group h and the query rows i of
//                softmax_j(scale * q[b,g,i] . k[b,h,j]), causal bottom-right aligned (row i sees
//                keys j <= i + Lk - Lq; a row that sees no key adds nothing).
// q [B,Hq,Lq,D], k [B,Hkv,Lk,D] fp16/bf16/fp32, any strides; fp32 arithmetic and output [B,Hkv,Lk].
//
// Work is cut, from the shape alone, into tasks: a run of query rows of one (batch, kv head)
// pair, or several whole short pairs. Threads take tasks one at a time from a shared counter
// (one parallel region, no barrier but its end), so a thread slowed by another process just
// takes fewer. A task runs on its thread alone: the keys it needs copied as contiguous fp32,
// then per block of rows a single-threaded GEMM of the G heads' rows against those keys
// (ATen's, called inside the parallel region, so it runs serially) and the fused
// softmax-and-column-sum tail (softmax_colsum, built per instruction set, cpu_isa.h) into the
// task's own fp32 column sums. Each pair's chunks are summed in chunk order at the end: the
// result depends neither on the thread count nor on which thread ran what.
// Memory: per thread a score block of about kBlockScores floats (at least G rows of all Lk
// keys), the task's keys as fp32 and its rows of q; the column sums of a pair's chunks stay
// under kPartialBytes in all. Never Lq x Lk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/cpu_isa.h"

namespace retake {
namespace {

// Scores per task: ~1-3 ms of GEMM, so a busy core's share of the work moves to the others,
// while copying the task's keys stays a few percent of it. Smaller (down to
// kMinTaskScores) when that would leave fewer than kMinTasks tasks.
constexpr int64_t kTaskScores = int64_t(1) << 20;
constexpr int64_t kMinTaskScores = int64_t(1) << 15;
constexpr int64_t kMinTasks = 16;
// Scores per GEMM block (2 MiB): rows enough for an efficient GEMM, the block still near the
// cache for the tail that reads it right after.
constexpr int64_t kBlockScores = int64_t(1) << 19;
// fp32 keys converted per block of several short pairs.
constexpr int64_t kBlockKeys = int64_t(1) << 19;
// The tasks' column sums, all live until the final sum (more only when the output is larger).
constexpr int64_t kPartialBytes = int64_t(64) << 20;
constexpr int64_t kPad = 16;  // floats: every compiled vector width divides it

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the (pair, query row) grid is cut, from the shape alone. A task is task_pairs whole pairs
// (short pairs), or one pair's run of chunk_rows rows (one of its `chunks`); a GEMM block is
// block_pairs x block_rows of it.
struct Plan {
  int64_t rows, chunk_rows, chunks, task_pairs, block_rows, block_pairs;
  int64_t ld;  // floats per row of a score block and of a column sum: Lk padded
};

Plan make_plan(int64_t pairs, int64_t G, int64_t rows, int64_t Lk, int64_t D) {
  Plan p;
  p.rows = rows;
  p.ld = div_up(Lk, kPad) * kPad;
  const int64_t pair_scores = G * rows * Lk;
  const int64_t target = std::clamp(pairs * pair_scores / kMinTasks, kMinTaskScores, kTaskScores);
  if (pair_scores > target) {
    const int64_t max_chunks = std::max<int64_t>(1, kPartialBytes / (pairs * p.ld * 4));
    p.chunks = std::min({div_up(pair_scores, target), max_chunks, rows});
    p.chunk_rows = div_up(rows, p.chunks);
    p.chunks = div_up(rows, p.chunk_rows);
    p.task_pairs = 1;
  } else {
    p.chunks = 1;
    p.chunk_rows = rows;
    p.task_pairs = std::clamp<int64_t>(target / std::max<int64_t>(1, pair_scores), 1, pairs);
  }
  p.block_rows = std::clamp<int64_t>(kBlockScores / (G * p.ld), 1, p.chunk_rows);
  p.block_pairs = p.block_rows < p.chunk_rows ? 1
      : std::clamp<int64_t>(std::min(kBlockScores / (G * p.chunk_rows * p.ld), kBlockKeys / (p.ld * D)), 1,
                            p.task_pairs);
  return p;
}

at::Tensor attn_scores_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale_opt,
                           bool causal) {
  check_attn_scores_args(q, k, scale_opt);
  const CpuIsa& isa = cpu_isa();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), G = Hq / Hkv;
  const double scale = scale_opt ? *scale_opt : 1.0 / std::sqrt(static_cast<double>(D));
  const auto f32 = q.options().dtype(at::kFloat);
  auto out = at::zeros({B, Hkv, Lk}, f32);
  // Row i sees keys j < i + shift + 1 (all Lk keys when not causal).
  const int64_t shift = causal ? Lk - Lq : Lk;
  const int64_t first_row = std::max<int64_t>(0, -shift);
  if (B == 0 || Lk == 0 || first_row >= Lq) return out;
  const int64_t pairs = B * Hkv;
  const Plan p = make_plan(pairs, G, Lq - first_row, Lk, D);
  const int64_t groups = div_up(pairs, p.task_pairs), tasks = groups * p.chunks;
  // [pairs, G, Lq, D] and [pairs, Lk, D]: views for the usual layouts, else one copy.
  const at::Tensor qp = q.unflatten(1, {Hkv, G}).flatten(0, 1);
  const at::Tensor kp = k.flatten(0, 1);
  auto partial = at::zeros({pairs * p.chunks, p.ld}, f32);
  float* partial_data = partial.data_ptr<float>();
  auto visible = [&](int64_t i) { return std::min(Lk, i + shift + 1); };

  std::atomic<int64_t> next{0};
  // One worker per thread, never more than tasks: a single task runs inline, with no parallel region.
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks), 1, [&](int64_t, int64_t) {
    c10::InferenceMode inference;  // the worker's own ATen calls: no autograd bookkeeping
    const int64_t key_pairs = p.task_pairs == 1 ? 1 : p.block_pairs;
    auto scores = at::empty({p.block_pairs * G * p.block_rows * p.ld}, f32);
    auto q_rows = at::empty({p.block_pairs * G * p.block_rows * D}, f32);
    const at::Tensor k_rows = at::empty({key_pairs * Lk * D}, f32);
    std::vector<int64_t> counts(G * p.block_rows);
    for (int64_t task; (task = next.fetch_add(1)) < tasks;) {
      // Heaviest first: with causal masking the last rows of a pair see the most keys.
      const int64_t chunk = p.chunks - 1 - task / groups, group = task % groups;
      const int64_t pair_begin = group * p.task_pairs, pair_end = std::min(pairs, pair_begin + p.task_pairs);
      const int64_t r_begin = first_row + chunk * p.chunk_rows, r_end = std::min(Lq, r_begin + p.chunk_rows);
      // Even blocks: no small remainder block with a poor GEMM.
      const int64_t rb = div_up(r_end - r_begin, div_up(r_end - r_begin, p.block_rows));
      for (int64_t p0 = pair_begin; p0 < pair_end; p0 += p.block_pairs) {
        const int64_t P = std::min(p.block_pairs, pair_end - p0);
        // The keys every row of this block's pairs in the task needs, as contiguous fp32
        // [P, n, D] in the thread's own buffer (faster GEMMs than k in place, fp32 or not); one
        // copy serves all the row blocks of a chunk.
        const int64_t n_keys = visible(r_end - 1);
        const at::Tensor keys =
            k_rows.narrow(0, 0, P * n_keys * D).view({P, n_keys, D}).copy_(kp.narrow(0, p0, P).narrow(1, 0, n_keys));
        for (int64_t r0 = r_begin; r0 < r_end; r0 += rb) {
          const int64_t R = std::min(rb, r_end - r0), n = visible(r0 + R - 1);
          auto qb = q_rows.narrow(0, 0, P * G * R * D).view({P, G, R, D});
          qb.copy_(qp.narrow(0, p0, P).narrow(2, r0, R));
          auto s = scores.narrow(0, 0, P * G * R * p.ld).view({P, G * R, p.ld}).narrow(2, 0, n);
          // beta = 0: s is written, never read (its garbage, even NaN, does not propagate).
          at::baddbmm_out(s, s, qb.view({P, G * R, D}), keys.narrow(1, 0, n).transpose(1, 2), 0.0, scale);
          for (int64_t g = 0; g < G; ++g)
            for (int64_t t = 0; t < R; ++t) counts[g * R + t] = visible(r0 + t);
          for (int64_t i = 0; i < P; ++i)
            isa.softmax_colsum(scores.data_ptr<float>() + i * G * R * p.ld, G * R, p.ld, counts.data(),
                               partial_data + ((p0 + i) * p.chunks + chunk) * p.ld);
        }
      }
    }
  });

  // Each pair's chunks in chunk order, whichever thread ran them.
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (p.chunks * Lk));  // ~256 KiB of sums
  at::parallel_for(0, pairs, grain, [&](int64_t pair0, int64_t pair1) {
    for (int64_t pair = pair0; pair < pair1; ++pair) {
      float* dst = o + pair * Lk;
      for (int64_t c = 0; c < p.chunks; ++c) {
        const float* src = partial_data + (pair * p.chunks + c) * p.ld;
        for (int64_t j = 0; j < Lk; ++j) dst[j] += src[j];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retake, CPU, m) { m.impl("attn_scores", &attn_scores_cpu); }

}  // namespace retake
