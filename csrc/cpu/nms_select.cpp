// nms_select CPU kernel: scores [B,N] (fp16/bf16/fp32, any strides) -> int64 [B,k] ascending.
// Greedy NMS (highest unsuppressed score first, ties to the lower index, suppress
// |i - j| <= radius) equals one walk over the row in (score desc, index asc) order:
// suppression only grows, so the next unsuppressed frame in that order is always the
// best unsuppressed one. The walk ends when no free frame above -inf is left (-inf
// frames never take part in NMS); the continuation takes frames not yet taken in the
// same order, i.e. the walk's skipped (suppressed) frames merged with the frames it
// never reached. A binary heap yields the order lazily: O(N) to build plus O(log N)
// per visited frame, O(N log N) at worst, and the walk usually ends long before the
// row does. Rows run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "checks.h"

namespace retake {

namespace {

constexpr const char* kOp = "nms_select";
constexpr int64_t kMaxFrames = (int64_t(1) << 31) - 1;

// Sort key: ascending order of keys = score descending, then index ascending.
// -0.0 and +0.0 compare equal as floats, so they share one key; -inf maps to the top
// score key below NaN, i.e. after every finite and +inf score.
inline uint64_t rank_key(float v, int64_t j) {
  v += 0.0f;  // -0.0 -> +0.0
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(~ascending) << 32) | uint64_t(j);
}

enum : uint8_t { kFree = 0, kSuppressed = 1, kTaken = 2 };

}  // namespace

at::Tensor nms_select_cpu(const at::Tensor& scores, int64_t k, int64_t radius) {
  check_rank(kOp, "scores", scores, 2, "[B, N]");
  check_float(kOp, "scores", scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(N <= kMaxFrames, kOp, ": scores has N=", N, " frames, at most ", kMaxFrames,
                    " are supported");
  TORCH_CHECK_VALUE(k >= 0 && k <= N, kOp, ": k must be in [0, N=", N, "], got ", k);
  TORCH_CHECK_VALUE(radius >= -1, kOp, ": radius must be >= 0, or -1 for N // (4k), got ", radius);
  const int64_t r = radius != -1 ? radius : (k > 0 ? N / (4 * k) : 0);

  const at::Tensor x = scores.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  const float* px = x.data_ptr<float>();
  int64_t* po = out.data_ptr<int64_t>();
  std::atomic<bool> has_nan{false};

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> heap(N), skipped;
    std::vector<uint8_t> state(N);
    const std::greater<uint64_t> min_first;
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = px + b * N;
      int64_t nan_count = 0, eligible = 0;  // eligible: free frames above -inf
      for (int64_t j = 0; j < N; ++j) {
        nan_count += std::isnan(row[j]);
        eligible += row[j] != -INFINITY;
        heap[j] = rank_key(row[j], j);
      }
      if (nan_count) {
        has_nan = true;
        continue;
      }
      if (k == 0) continue;
      std::make_heap(heap.begin(), heap.end(), min_first);
      size_t left = size_t(N);  // heap[0, left) holds the frames the walk has not reached
      auto pop = [&] {
        std::pop_heap(heap.begin(), heap.begin() + left, min_first);
        return heap[--left];
      };
      std::fill(state.begin(), state.end(), kFree);
      skipped.clear();
      int64_t* picks = po + b * k;
      int64_t n = 0;
      auto suppress = [&](int64_t i) {
        state[i] = kSuppressed;
        eligible -= row[i] != -INFINITY;
      };
      // Every free frame is still in the heap, and free frames above -inf come before any
      // -inf key, so while one is eligible the walk never pops a -inf frame.
      while (n < k && eligible > 0) {
        const uint64_t key = pop();
        const int64_t j = int64_t(key & 0xffffffffu);
        if (state[j] != kFree) {
          skipped.push_back(key);  // popped in order, so skipped stays sorted
          continue;
        }
        state[j] = kTaken;
        --eligible;
        picks[n++] = j;
        // Stop at the first frame already suppressed: it lies in the interval of an
        // earlier pick on the same side, which covers the rest of this side's interval.
        // So each frame is marked once and a row's marking costs O(N) whatever the radius.
        for (int64_t i = j + 1; i < N && i - j <= r && state[i] == kFree; ++i) suppress(i);
        for (int64_t i = j - 1; i >= 0 && j - i <= r && state[i] == kFree; --i) suppress(i);
      }
      for (size_t s = 0; n < k; ++n) {
        const bool from_skipped = s < skipped.size() && (left == 0 || skipped[s] < heap[0]);
        picks[n] = int64_t((from_skipped ? skipped[s++] : pop()) & 0xffffffffu);
      }
      std::sort(picks, picks + k);
    }
  });
  TORCH_CHECK_VALUE(!has_nan, kOp,
                    ": scores contains NaN, expected finite or +-inf scores (use -inf for unwanted frames)");
  return out;
}

TORCH_LIBRARY_IMPL(retake, CPU, m) { m.impl("nms_select", &nms_select_cpu); }

}  // namespace retake
