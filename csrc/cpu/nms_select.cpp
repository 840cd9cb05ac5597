// nms_select CPU kernel: scores [B,N] (fp16/bf16/fp32, any strides) -> int64 [B,k] ascending.
// Greedy NMS: take the best free frame above -inf (score desc, ties to the lower index),
// suppress |i - j| <= radius, repeat; then the best frames not yet taken. "Best" is the
// min of a 64-bit key (score descending, index ascending) held in a tournament tree
// over the row: leaves are the frames still in play (kNone otherwise), every inner node
// the min of its children, so the root is the next pick. Suppression removes a range of
// leaves and recomputes only their ancestors; each frame is suppressed once, so the NMS
// phase costs O(N + k log N) per row whatever the radius, and the continuation (a tree
// rebuilt over the frames not yet taken) as much. Rows run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "ranking.h"

namespace retake {

namespace {

// Rank keys (csrc/ranking.h): -0.0 and +0.0 share one key; -inf maps above every finite and
// +inf score.
inline uint64_t rank_key(float v, int64_t j) { return nms_rank_key(v, static_cast<uint32_t>(j)); }

constexpr uint64_t kNone = ~uint64_t(0);  // no frame: above every rank key (indices < 2^32 - 1)

// Min tournament tree over P (a power of two >= N) leaves: node i has children 2i, 2i+1,
// leaf j sits at P + j, the root at 1 holds the min of all leaves.
struct MinTree {
  int64_t P = 1;
  std::vector<uint64_t> t;

  void reset(int64_t N) {
    P = 1;
    while (P < N) P <<= 1;
    t.assign(2 * P, kNone);
  }
  uint64_t& leaf(int64_t j) { return t[P + j]; }
  uint64_t best() const { return t[1]; }
  void build() {
    for (int64_t i = P - 1; i >= 1; --i) t[i] = std::min(t[2 * i], t[2 * i + 1]);
  }
  // Leaves [a, b] changed: recompute their ancestors level by level.
  void update(int64_t a, int64_t b) {
    for (a = (P + a) >> 1, b = (P + b) >> 1; a >= 1; a >>= 1, b >>= 1)
      for (int64_t i = a; i <= b; ++i) t[i] = std::min(t[2 * i], t[2 * i + 1]);
  }
};

enum : uint8_t { kFree = 0, kSuppressed = 1, kTaken = 2 };

}  // namespace

at::Tensor nms_select_cpu(const at::Tensor& scores, int64_t k, int64_t radius) {
  const int64_t r = check_nms_select_args(scores, k, radius);
  const int64_t B = scores.size(0), N = scores.size(1);

  const at::Tensor x = scores.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  const float* px = x.data_ptr<float>();
  int64_t* po = out.data_ptr<int64_t>();
  std::atomic<bool> has_nan{false};

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    MinTree tree;
    std::vector<uint8_t> state(N);
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = px + b * N;
      tree.reset(N);
      int64_t nan_count = 0;
      for (int64_t j = 0; j < N; ++j) {
        nan_count += std::isnan(row[j]);
        tree.leaf(j) = row[j] == -INFINITY ? kNone : rank_key(row[j], j);  // -inf never takes part in NMS
      }
      if (nan_count) {
        has_nan = true;
        continue;
      }
      if (k == 0) continue;
      tree.build();
      std::fill(state.begin(), state.end(), kFree);
      int64_t* picks = po + b * k;
      int64_t n = 0;
      while (n < k && tree.best() != kNone) {
        const int64_t j = int64_t(tree.best() & 0xffffffffu);
        state[j] = kTaken;
        picks[n++] = j;
        // Suppress outwards from j, stopping at the first frame already suppressed: it lies
        // in the interval of an earlier pick on the same side, which covers the rest of this
        // side. So [lo, hi] holds exactly the frames that leave play now.
        int64_t lo = j, hi = j;
        while (lo > 0 && j - (lo - 1) <= r && state[lo - 1] == kFree) state[--lo] = kSuppressed;
        while (hi < N - 1 && (hi + 1) - j <= r && state[hi + 1] == kFree) state[++hi] = kSuppressed;
        for (int64_t i = lo; i <= hi; ++i) tree.leaf(i) = kNone;
        tree.update(lo, hi);
      }
      if (n < k) {  // continuation: the best frames not yet taken, -inf ones last
        for (int64_t j = 0; j < N; ++j) tree.leaf(j) = state[j] == kTaken ? kNone : rank_key(row[j], j);
        tree.build();
        for (; n < k; ++n) {
          const int64_t j = int64_t(tree.best() & 0xffffffffu);
          picks[n] = j;
          tree.leaf(j) = kNone;
          tree.update(j, j);
        }
      }
      std::sort(picks, picks + k);
    }
  });
  check_scores_without_nan(has_nan);
  return out;
}

TORCH_LIBRARY_IMPL(retake, CPU, m) { m.impl("nms_select", &nms_select_cpu); }

}  // namespace retake
