// frame_distance CPU kernel.
//   d[b,t,n] = 1 - <x[b,t-1,n], x[b,t,n]> / (max(|x[b,t-1,n]|, 1e-8) * max(|x[b,t,n]|, 1e-8))
//   d[b,0,n] = first; sync averages over n (in order).
// feats [B,T,N,C] in fp16/bf16/fp32 (made contiguous), output fp32, fp32 accumulation.
// One pass over the features: tasks own runs of frames of one batch row and carry each
// patch's squared norm from frame t-1 to frame t, so frame t-1 is re-read from cache only.
// Any magnitude: a vector whose squared norm reaches 2^126 (bf16/fp32 beyond ~1e19) would
// overflow the sums; the pair is then summed again with that vector scaled by 2^-100, exact
// for a power of two. Its norm is then far above eps, so the clamp never applies to it and the
// scale cancels in the cosine. Smaller vectors need nothing: where their products underflow,
// the clamp at eps makes the lost terms negligible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/frame_distance.h"

namespace retake {
namespace {

constexpr int kLanes = 16;          // independent partial sums: lets the compiler vectorize
constexpr int64_t kFramesPerTask = 16;
constexpr float kEps = 1e-8f;
constexpr float kHuge = 0x1p126f;   // squared norms from here on are summed scaled
constexpr float kShrink = 0x1p-100f;

// Sums a.b and b.b over C elements, plus a probe that turns NaN iff b holds NaN or Inf.
template <typename scalar_t>
inline void pair_sums(const scalar_t* a, const scalar_t* b, int64_t C, float& ab, float& bb, float& probe) {
  float s_ab[kLanes] = {}, s_bb[kLanes] = {}, s_pr[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float x = static_cast<float>(a[c + j]), y = static_cast<float>(b[c + j]);
      s_ab[j] += x * y;
      s_bb[j] += y * y;
      s_pr[j] += y * 0.0f;
    }
  }
  for (int64_t r = 0; c < C; ++c, ++r) {
    const float x = static_cast<float>(a[c]), y = static_cast<float>(b[c]);
    s_ab[r] += x * y;
    s_bb[r] += y * y;
    s_pr[r] += y * 0.0f;
  }
  ab = bb = probe = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    ab += s_ab[j];
    bb += s_bb[j];
    probe += s_pr[j];
  }
}

template <typename scalar_t>
inline void self_sums(const scalar_t* b, int64_t C, float& bb, float& probe) {
  float s_bb[kLanes] = {}, s_pr[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float y = static_cast<float>(b[c + j]);
      s_bb[j] += y * y;
      s_pr[j] += y * 0.0f;
    }
  }
  for (int64_t r = 0; c < C; ++c, ++r) {
    const float y = static_cast<float>(b[c]);
    s_bb[r] += y * y;
    s_pr[r] += y * 0.0f;
  }
  bb = probe = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    bb += s_bb[j];
    probe += s_pr[j];
  }
}

// The distance of a pair with a huge vector (squared norm aa or bb >= kHuge, from the fast sums).
template <typename scalar_t>
float scaled_distance(const scalar_t* a, const scalar_t* b, int64_t C, float aa, float bb) {
  const bool huge_a = aa >= kHuge, huge_b = bb >= kHuge;
  const float fa = huge_a ? kShrink : 1.0f, fb = huge_b ? kShrink : 1.0f;
  float ab_s = 0.0f, aa_s = 0.0f, bb_s = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float x = static_cast<float>(a[c]) * fa, y = static_cast<float>(b[c]) * fb;
    ab_s += x * y;
    aa_s += x * x;
    bb_s += y * y;
  }
  const float na = huge_a ? std::sqrt(aa_s) : std::max(std::sqrt(aa), kEps);
  const float nb = huge_b ? std::sqrt(bb_s) : std::max(std::sqrt(bb), kEps);
  return 1.0f - ab_s / (na * nb);
}

template <typename scalar_t>
void frame_distance_kernel(const scalar_t* x, float* out, int64_t B, int64_t T, int64_t N, int64_t C,
                           bool sync, float first, std::atomic<bool>& nonfinite) {
  const int64_t chunks = (T + kFramesPerTask - 1) / kFramesPerTask;
  at::parallel_for(0, B * chunks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> prev_sq(N);
    bool bad = false;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / chunks;
      const int64_t t0 = (u % chunks) * kFramesPerTask;
      const int64_t t1 = std::min(T, t0 + kFramesPerTask);
      const scalar_t* xb = x + b * T * N * C;
      float probe;
      if (t0 > 0)
        for (int64_t n = 0; n < N; ++n) self_sums(xb + ((t0 - 1) * N + n) * C, C, prev_sq[n], probe);
      for (int64_t t = t0; t < t1; ++t) {
        float* row = sync ? out + b * T + t : out + (b * T + t) * N;
        float total = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* cur = xb + (t * N + n) * C;
          float d = first, sq;
          if (t == 0) {
            self_sums(cur, C, sq, probe);
          } else {
            float ab;
            pair_sums(cur - N * C, cur, C, ab, sq, probe);
            if (prev_sq[n] >= kHuge || sq >= kHuge) {
              d = scaled_distance(cur - N * C, cur, C, prev_sq[n], sq);
            } else {
              const float na = std::max(std::sqrt(prev_sq[n]), kEps), nb = std::max(std::sqrt(sq), kEps);
              d = 1.0f - ab / (na * nb);
            }
          }
          bad |= !(probe == 0.0f);
          prev_sq[n] = sq;
          if (sync)
            total += d;
          else
            row[n] = d;
        }
        if (sync) *row = t == 0 ? first : total / static_cast<float>(N);
      }
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  });
}

}  // namespace

at::Tensor frame_distance_cpu_impl(const at::Tensor& feats, bool sync, double first, bool check_finite,
                                   const char* op) {
  const at::Tensor x = feats.contiguous();
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), C = x.size(3);
  at::Tensor out = at::empty(sync ? at::IntArrayRef{B, T} : at::IntArrayRef{B, T, N},
                             x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  std::atomic<bool> nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_distance_cpu", [&] {
    frame_distance_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<float>(), B, T, N, C, sync,
                                    static_cast<float>(first), nonfinite);
  });
  check_features_finite(op, check_finite && nonfinite.load());
  return out;
}

at::Tensor frame_distance_cpu(const at::Tensor& feats, bool sync, double first, bool check_finite) {
  check_frame_distance_args(feats, first);
  return frame_distance_cpu_impl(feats, sync, first, check_finite, "frame_distance");
}

TORCH_LIBRARY_IMPL(retake, CPU, m) { m.impl("frame_distance", &frame_distance_cpu); }

}  // namespace retake
