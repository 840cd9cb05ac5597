"""retake::local_peaks(dist[..., T], window=3) -> bool[..., T].

t is a peak iff dist[t] is the first maximum of the window [t - window//2, t + window//2]
clipped to [0, T): plateaus peak at their left end, edges can peak, NaN counts as -inf.
Inference-only (an input that requires grad under grad mode raises at call time).

Kernels:
  CPU   local_peaks_cpu   csrc/cpu/local_peaks.cpp (C++, retake_ops._C)
  CUDA  local_peaks_cuda  csrc/cuda/local_peaks_bind.cpp + local_peaks.cu (retake_ops._C)
  else  the body below: retake_ops.ref.local_peaks (python_ref/local_peaks.py)
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import check_local_peaks
from ._registry import inference_only

OP = "local_peaks"


@torch.library.custom_op("retake::local_peaks", mutates_args=())
def local_peaks(dist: Tensor, window: int = 3) -> Tensor:
    """Bool mask of the first maxima of each odd-sized window along the last dim."""
    check_local_peaks(dist, window)
    return ref.local_peaks(dist, window)


@local_peaks.register_fake
def _(dist, window=3):
    check_local_peaks(dist, window)
    return torch.empty_like(dist, dtype=torch.bool, memory_format=torch.contiguous_format)


inference_only(OP, local_peaks)
