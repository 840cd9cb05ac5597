"""retake::frame_distance(feats[B,T,N,C], sync=True, first=1.0, check_finite=True) -> fp32.

d[b,t,n] = 1 - cos(feats[b,t-1,n], feats[b,t,n]) in fp32 as F.cosine_similarity(eps=1e-8)
gives it in exact arithmetic, d[b,0,n] = first; sync=True averages over N -> [B,T], else
[B,T,N]. Finite features give finite, correct distances at any magnitude: a vector whose
squares would overflow fp32 is scaled down before squaring. Inference-only: an input that
requires grad (under grad mode) raises RuntimeError at call time.

Kernels:
  CPU   frame_distance_cpu   csrc/cpu/frame_distance.cpp (C++, retake_ops._C)
  CUDA  frame_distance_cuda  csrc/cuda/frame_distance_bind.cpp + frame_distance.cu (retake_ops._C)
  else  the body below: retake_ops.ref.frame_distance (python_ref/frame_distance.py)
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import check_frame_distance
from ._registry import inference_only

OP = "frame_distance"


@torch.library.custom_op("retake::frame_distance", mutates_args=())
def frame_distance(feats: Tensor, sync: bool = True, first: float = 1.0,
                   check_finite: bool = True) -> Tensor:
    """Cosine distance between adjacent frames' features, fp32 [B,T] (sync) or [B,T,N].

    `first` (the distance of frame 0) must be within the float32 range or +-inf. Non-finite features
    raise ValueError unless check_finite=False (one scalar is read back; turn it off for CUDA
    graphs), in which case their distances are NaN and rank lowest in local_peaks and
    dpselect. Inference-only.
    """
    check_frame_distance(feats, first)
    return ref.frame_distance(feats, sync, first, check_finite)


@frame_distance.register_fake
def _(feats, sync=True, first=1.0, check_finite=True):
    check_frame_distance(feats, first)
    B, T, N, _ = feats.shape
    return feats.new_empty((B, T) if sync else (B, T, N), dtype=torch.float32)


inference_only(OP, frame_distance)
