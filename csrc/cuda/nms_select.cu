// nms_select CUDA kernel: scores [B,N] contiguous (fp32/fp16/bf16, read as fp32) -> int64 [B,k] ascending.
// One block per row runs the greedy loop on the device. Each pick is a block-wide
// min over 64-bit keys (score descending in the high word, index in the low word,
// so the min is the best score with ties to the lower index): one min over free
// frames with a score above -inf (the NMS phase), one over frames not yet taken
// (the continuation once the NMS phase has no frame left). The winner is marked
// taken and its neighbours |i - j| <= radius suppressed. Finally the taken frames
// are compacted in index order, which gives the ascending output. A row with NaN
// sets *nan_flag and writes nothing; the host reads the flag once after the launch.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/nms_select.h"
#include "ranking.h"

namespace retake {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned long long kNone = ~0ull;

enum : uint8_t { kFree = 0, kSuppressed = 1, kTaken = 2 };

// The CPU kernel's key (csrc/ranking.h): ascending key = score descending, then index ascending.
__device__ __forceinline__ unsigned long long rank_key(float v, int j) {
  return nms_rank_key(v, static_cast<uint32_t>(j));
}

__device__ __forceinline__ unsigned long long warp_min(unsigned long long v) {
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o < v ? o : v;
  }
  return v;
}

// Block-wide min of two keys; every thread gets both results.
__device__ __forceinline__ void block_min2(unsigned long long& a, unsigned long long& b,
                                           unsigned long long (*smem)[kWarps]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_min(a);
  b = warp_min(b);
  if (lane == 0) {
    smem[0][warp] = a;
    smem[1][warp] = b;
  }
  __syncthreads();
  a = kNone;
  b = kNone;
  for (int w = 0; w < kWarps; ++w) {
    a = smem[0][w] < a ? smem[0][w] : a;
    b = smem[1][w] < b ? smem[1][w] : b;
  }
  __syncthreads();  // smem is reused by the next call
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nms_select_kernel(const T* __restrict__ scores, int N, int k,
                                                              long long radius, int64_t* __restrict__ out,
                                                              uint8_t* __restrict__ state, int* __restrict__ nan_flag) {
  __shared__ unsigned long long smem[2][kWarps];
  __shared__ int warp_count[kWarps];
  const long long b = blockIdx.x;
  const T* row = scores + b * N;
  uint8_t* st = state + b * N;
  int64_t* picks = out + b * k;

  int nan_seen = 0;
  for (long long j = threadIdx.x; j < N; j += kThreads) {
    nan_seen |= isnan(to_float(row[j]));
    st[j] = kFree;
  }
  if (__syncthreads_or(nan_seen)) {
    if (threadIdx.x == 0) atomicExch(nan_flag, 1);
    return;
  }

  for (int n = 0; n < k; ++n) {
    unsigned long long nms = kNone, rest = kNone;
    for (long long j = threadIdx.x; j < N; j += kThreads) {
      const uint8_t s = st[j];
      if (s == kTaken) continue;
      const float v = to_float(row[j]);
      const unsigned long long key = rank_key(v, static_cast<int>(j));
      rest = key < rest ? key : rest;
      if (s == kFree && v != -INFINITY) nms = key < nms ? key : nms;
    }
    block_min2(nms, rest, smem);
    const bool nms_phase = nms != kNone;
    const int p = static_cast<int>((nms_phase ? nms : rest) & 0xffffffffu);
    if (nms_phase) {
      // Clamped in 64 bits: radius may be anything up to INT64_MAX.
      const long long lo = p - radius < 0 ? 0 : p - radius;
      const long long hi = radius >= N - 1 - p ? N - 1 : p + radius;
      for (long long i = lo + threadIdx.x; i <= hi; i += kThreads)
        if (st[i] == kFree) st[i] = kSuppressed;
    }
    __syncthreads();  // the suppression writes land before the pick is marked taken
    if (threadIdx.x == 0) st[p] = kTaken;
    __syncthreads();
  }

  // Ascending output: write the taken frames in index order, one tile of kThreads at a time.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int base = 0;
  for (int tile = 0; tile < N && base < k; tile += kThreads) {
    const int j = tile + threadIdx.x;
    const bool taken = j < N && st[j] == kTaken;
    const unsigned ballot = __ballot_sync(0xffffffffu, taken);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = base, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (taken) picks[offset + __popc(ballot & ((1u << lane) - 1u))] = j;
    base += total;
    __syncthreads();  // warp_count is rewritten by the next tile
  }
}

}  // namespace

cudaError_t nms_select_launch(const void* scores, DType dtype, int64_t B, int64_t N, int64_t k, int64_t radius,
                              int64_t* out, uint8_t* state, int* nan_flag, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto typed) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    nms_select_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        static_cast<const T*>(scores), static_cast<int>(N), static_cast<int>(k), static_cast<long long>(radius),
        out, state, nan_flag);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retake
