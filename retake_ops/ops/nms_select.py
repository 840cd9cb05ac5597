"""retake::nms_select(scores[B,N], k, radius=-1) -> int64 [B,k] ascending.

Greedy temporal NMS: take the highest unsuppressed score (ties: lower index), suppress every
frame j with |i - j| <= radius, repeat; radius=-1 means N // (4k). When every frame is
suppressed before k are taken, continue with the best frames not yet taken. -inf frames never
win or suppress in the NMS phase, so they are taken last, only when needed; NaN scores raise.
Scores are fp16/bf16/fp32 and ranked in their own precision (float64 is rejected, never
rounded; select_frames ranks a float64 scorer's output exactly). Inference-only (an input that
requires grad under grad mode raises at call time).

Kernels:
  CPU   nms_select_cpu   csrc/cpu/nms_select.cpp (C++, retake_ops._C)
  CUDA  nms_select_cuda  csrc/cuda/nms_select_bind.cpp + nms_select.cu (retake_ops._C)
  else  the body below: retake_ops.ref.nms_select (python_ref/nms_select.py)
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import check_nms_select
from ._registry import inference_only

OP = "nms_select"


@torch.library.custom_op("retake::nms_select", mutates_args=())
def nms_select(scores: Tensor, k: int, radius: int = -1) -> Tensor:
    """Greedy NMS frame selection: k frame indices per row, int64 [B, k] ascending.

    scores: [B, N] fp16/bf16/fp32, any strides. Picks are relevant (high score) and
    spread out (no two NMS picks within `radius` frames) until every frame is
    suppressed; the rest of the k are the best frames not yet taken. -inf marks an
    unwanted frame (taken only after every finite one); NaN raises ValueError.
    Deterministic, identical on CPU and CUDA, ties included. Inference-only.
    """
    check_nms_select(scores, k, radius)
    return ref.nms_select(scores, k, radius)


@nms_select.register_fake
def _(scores, k, radius=-1):
    check_nms_select(scores, k, radius)
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


inference_only(OP, nms_select)
