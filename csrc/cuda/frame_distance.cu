// frame_distance CUDA kernels.
//   d[b,t,n] = 1 - <x[b,t-1,n], x[b,t,n]> / (max(|x[b,t-1,n]|, 1e-8) * max(|x[b,t,n]|, 1e-8))
//   d[b,0,n] = first; optional mean over n (sync).
// feats contiguous [B,T,N,C] fp32/fp16/bf16; fp32 accumulation and output.
// frame_distance_kernel: one warp owns a run of frames of one (b, n) column: per frame it reduces
// the dot product with the previous frame and the squared norm together, carrying the norm to
// the next frame, so each feature is read from DRAM once (frame t-1 is re-read from L1/L2).
// 16-byte vector loads when C and the base pointer allow. Any magnitude: a vector whose squared
// norm reaches 2^126 (bf16/fp32 beyond ~1e19) would overflow the sums; the warp then sums the
// pair again with that vector scaled by 2^-100 (exact, a power of two): its norm is far above
// eps, so the clamp never applies to it and the scale cancels in the cosine.
// patch_mean_kernel (sync): one warp per (b, t) row sums its N distances, lanes striding over n
// (coalesced) and a butterfly at the end: the mean is as parallel as the distances, in a fixed
// order, so it is deterministic.
#include "cuda/common.cuh"
#include "cuda/frame_distance.h"

namespace retake {
namespace cuda {
namespace {

constexpr int kFramesPerWarp = 8;
constexpr int kWarpsPerBlock = 8;
constexpr float kEps = 1e-8f;
constexpr float kHuge = 0x1p126f;
constexpr float kShrink = 0x1p-100f;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// 1 - cos of the pair (prev, cur) when prev_sq or cur_sq (unscaled squared norms) is >= kHuge.
template <typename T, int V>
__device__ float scaled_distance(const T* __restrict__ prev, const T* __restrict__ cur, int64_t C, int lane,
                                 float prev_sq, float cur_sq) {
  const bool huge_a = prev_sq >= kHuge, huge_b = cur_sq >= kHuge;
  const float fa = huge_a ? kShrink : 1.0f, fb = huge_b ? kShrink : 1.0f;
  float ab = 0.0f, aa = 0.0f, bb = 0.0f;
  for (int64_t c = static_cast<int64_t>(lane) * V; c < C; c += 32 * V) {
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(prev + c);
    const Pack<T, V> q = *reinterpret_cast<const Pack<T, V>*>(cur + c);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float x = to_float(p.v[i]) * fa, y = to_float(q.v[i]) * fb;
      ab += x * y;
      aa += x * x;
      bb += y * y;
    }
  }
  ab = warp_sum(ab);
  aa = warp_sum(aa);
  bb = warp_sum(bb);
  const float na = huge_a ? sqrtf(aa) : fmaxf(sqrtf(prev_sq), kEps);
  const float nb = huge_b ? sqrtf(bb) : fmaxf(sqrtf(cur_sq), kEps);
  return 1.0f - ab / (na * nb);
}

template <typename T, int V>
__global__ void frame_distance_kernel(const T* __restrict__ x, int64_t B, int64_t T_, int64_t N, int64_t C,
                                      float first, float* __restrict__ d, int* nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t runs = (T_ + kFramesPerWarp - 1) / kFramesPerWarp;
  if (warp >= B * runs * N) return;  // uniform per warp
  const int64_t n = warp % N;
  const int64_t r = (warp / N) % runs;
  const int64_t b = warp / (N * runs);
  const int64_t t0 = r * kFramesPerWarp;
  const int64_t t1 = t0 + kFramesPerWarp < T_ ? t0 + kFramesPerWarp : T_;
  const int64_t frame_stride = N * C;
  const T* col = x + (b * T_ * N + n) * C;

  float prev_sq = 0.0f;
  if (t0 > 0) {
    const T* prev = col + (t0 - 1) * frame_stride;
    float s = 0.0f;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < C; c += 32 * V) {
      const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(prev + c);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float y = to_float(p.v[i]);
        s += y * y;
      }
    }
    prev_sq = warp_sum(s);
  }
  bool bad = false;
  for (int64_t t = t0; t < t1; ++t) {
    const T* cur = col + t * frame_stride;
    const T* prev = cur - frame_stride;
    float ab = 0.0f, bb = 0.0f;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < C; c += 32 * V) {
      const Pack<T, V> q = *reinterpret_cast<const Pack<T, V>*>(cur + c);
      Pack<T, V> p;
      if (t > 0) p = *reinterpret_cast<const Pack<T, V>*>(prev + c);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float y = to_float(q.v[i]);
        bb += y * y;
        bad |= !isfinite(y);
        if (t > 0) ab += to_float(p.v[i]) * y;
      }
    }
    ab = warp_sum(ab);
    bb = warp_sum(bb);  // the same value in every lane: the branch below is warp-uniform
    float dist = first;
    if (t > 0) {
      if (prev_sq >= kHuge || bb >= kHuge)
        dist = scaled_distance<T, V>(prev, cur, C, lane, prev_sq, bb);
      else
        dist = 1.0f - ab / (fmaxf(sqrtf(prev_sq), kEps) * fmaxf(sqrtf(bb), kEps));
    }
    if (lane == 0) d[(b * T_ + t) * N + n] = dist;
    prev_sq = bb;
  }
  if (nonfinite != nullptr && __any_sync(0xffffffffu, bad) && lane == 0) atomicOr(nonfinite, 1);
}

__global__ void patch_mean_kernel(const float* __restrict__ d, int64_t BT, int64_t T_, int64_t N, float first,
                                  float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (row >= BT) return;  // uniform per warp
  float total = 0.0f;
  for (int64_t n = lane; n < N; n += 32) total += d[row * N + n];
  total = warp_sum(total);
  if (lane == 0) out[row] = row % T_ == 0 ? first : total / static_cast<float>(N);
}

template <typename T>
cudaError_t launch_typed(const T* x, int64_t B, int64_t T_, int64_t N, int64_t C, float first, float* d,
                         int* nonfinite, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t runs = (T_ + kFramesPerWarp - 1) / kFramesPerWarp;
  const int64_t warps = B * runs * N;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const bool vec_ok = C % kVec == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (vec_ok)
    frame_distance_kernel<T, kVec><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, B, T_, N, C, first, d, nonfinite);
  else
    frame_distance_kernel<T, 1><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, B, T_, N, C, first, d, nonfinite);
  return cudaGetLastError();
}

}  // namespace

cudaError_t frame_distance_launch(const void* feats, DType dtype, int64_t B, int64_t T, int64_t N, int64_t C,
                                  float first, float* d, float* out_sync, int* nonfinite, cudaStream_t stream) {
  if (B * T * N == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    err = launch_typed(static_cast<const scalar_t*>(feats), B, T, N, C, first, d, nonfinite, stream);
  });
  if (err != cudaSuccess || out_sync == nullptr) return err;
  const int64_t BT = B * T;
  patch_mean_kernel<<<(BT + kWarpsPerBlock - 1) / kWarpsPerBlock, kWarpsPerBlock * 32, 0, stream>>>(d, BT, T, N,
                                                                                                    first, out_sync);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retake
