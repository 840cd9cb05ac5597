"""retake::dpselect(feats[B,T,N,C], num_frames, window=3, sync=True, check_finite=True)
-> (idx int64, is_pivot bool), [B,k] (sync) or [B,k,N] (per patch).

Frames rank peaks of frame_distance first, then larger distance, then lower index; the
first num_frames are returned ascending. Inference-only (an input that requires grad under
grad mode raises at call time).

Kernels:
  CPU   dpselect_cpu   csrc/cpu/dpselect.cpp (C++, retake_ops._C; distances from frame_distance_cpu)
  CUDA  dpselect_cuda  csrc/cuda/dpselect_bind.cpp + dpselect.cu (retake_ops._C; distances from
                       frame_distance_cuda, then torch's top-k over unique keys)
  else  the body below: retake_ops.ref.dpselect (python_ref/dpselect.py)
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import check_dpselect, check_target_frames
from ._registry import inference_only

OP = "dpselect"


@torch.library.custom_op("retake::dpselect", mutates_args=())
def dpselect(feats: Tensor, num_frames: int, window: int = 3, sync: bool = True,
             check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Keyframe selection: (frame indices ascending, whether each is a distance peak).

    sync=True ranks frames by the patch-averaged distance ([B, k]); sync=False ranks
    every patch position along time on its own ([B, k, N]). Deterministic, identical
    on CPU and CUDA, ties included. Inference-only.
    """
    check_dpselect(feats, num_frames, window)
    return ref.dpselect(feats, num_frames, window, sync, check_finite)


@dpselect.register_fake
def _(feats, num_frames, window=3, sync=True, check_finite=True):
    check_dpselect(feats, num_frames, window)
    B, _, N, _ = feats.shape
    shape = (B, num_frames) if sync else (B, num_frames, N)
    return feats.new_empty(shape, dtype=torch.int64), feats.new_empty(shape, dtype=torch.bool)


inference_only(OP, dpselect)


def target_frames(T: int, ratio: float) -> int:
    """max(1, round(ratio * T)) frames out of T (an int >= 1) for a keep ratio in (0, 1]."""
    return ref.target_frames(*check_target_frames(T, ratio))
