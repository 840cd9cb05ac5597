// CPU frame-distance kernel, shared by frame_distance_cpu and dpselect_cpu.
#pragma once
#include <ATen/ATen.h>

namespace retake {

// feats [B,T,N,C] (checked by the caller) -> fp32 [B,T] (sync) or [B,T,N].
// Raises ValueError on non-finite features when check_finite.
at::Tensor frame_distance_cpu_impl(const at::Tensor& feats, bool sync, double first, bool check_finite,
                                   const char* op);

}  // namespace retake
