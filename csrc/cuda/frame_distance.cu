// frame_distance CUDA kernels.
//   d[b,t,n] = 1 - <x[b,t-1,n], x[b,t,n]> / (max(|x[b,t-1,n]|, 1e-8) * max(|x[b,t,n]|, 1e-8))
//   d[b,0,n] = first; optional mean over n (sync).
// feats contiguous [B,T,N,C] fp32/fp16/bf16; fp32 accumulation and output.
// One warp owns a run of frames of one (b, n) column: per frame it reduces the dot product
// with the previous frame and the squared norm together, carrying the norm to the next frame,
// so each feature is read from DRAM once (frame t-1 is re-read from L1/L2). 16-byte vector
// loads when C and the base pointer allow. The sync mean sums n in order, like the CPU kernel.
#include "cuda/common.cuh"
#include "cuda/frame_distance.h"

namespace retake {
namespace cuda {
namespace {

constexpr int kFramesPerWarp = 8;
constexpr int kWarpsPerBlock = 8;
constexpr float kEps = 1e-8f;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

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
    bb = warp_sum(bb);
    if (lane == 0) {
      float dist = first;
      if (t > 0) dist = 1.0f - ab / (fmaxf(sqrtf(prev_sq), kEps) * fmaxf(sqrtf(bb), kEps));
      d[(b * T_ + t) * N + n] = dist;
    }
    prev_sq = bb;
  }
  if (nonfinite != nullptr && __any_sync(0xffffffffu, bad) && lane == 0) atomicOr(nonfinite, 1);
}

__global__ void mean_over_patches_kernel(const float* __restrict__ d, int64_t BT, int64_t T_, int64_t N,
                                         float first, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= BT) return;
  if (i % T_ == 0) {
    out[i] = first;
    return;
  }
  float total = 0.0f;
  for (int64_t n = 0; n < N; ++n) total += d[i * N + n];
  out[i] = total / static_cast<float>(N);
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
  mean_over_patches_kernel<<<(BT + 255) / 256, 256, 0, stream>>>(d, BT, T, N, first, out_sync);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retake
