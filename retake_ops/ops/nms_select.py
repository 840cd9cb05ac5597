"""retake::nms_select(scores[B,N], k, radius=-1) -> int64 [B,k] ascending.

Greedy temporal NMS: take the highest unsuppressed score (ties: lower index),
suppress every frame j with |i - j| <= radius, repeat; radius=-1 means
N // (4k). When every frame is suppressed before k are taken, continue with the
best frames not yet taken. -inf frames never win or suppress in the NMS phase,
so they are taken last, only when needed; NaN scores raise. Inference-only.
"""
import torch
from torch import Tensor

from .. import ref
from ._checks import check_float, check_rank

OP = "nms_select"
MAX_FRAMES = (1 << 31) - 1  # the CUDA kernel indexes frames with int and packs them into 32 bits


def check_nms_select(scores: Tensor, k: int, radius: int) -> None:
    check_rank(OP, "scores", scores, 2, "[B, N]")
    check_float(OP, "scores", scores)
    N = scores.shape[1]
    if N > MAX_FRAMES:
        raise ValueError(f"{OP}: scores has N={N} frames, at most {MAX_FRAMES} are supported")
    if not 0 <= k <= N:
        raise ValueError(f"{OP}: k must be in [0, N={N}], got {k}")
    if radius < -1:
        raise ValueError(f"{OP}: radius must be >= 0, or -1 for N // (4k), got {radius}")


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
