"""retake::dpselect(feats[B,T,N,C], num_frames, window=3, sync=True, check_finite=True)
-> (idx int64, is_pivot bool), [B,k] (sync) or [B,k,N] (per patch).

Frames rank peaks of frame_distance first, then larger distance, then lower
index; the first num_frames are returned ascending. Inference-only.
"""
import torch
from torch import Tensor

from .. import ref
from ._checks import check_window
from .frame_distance import check_frame_distance

OP = "dpselect"
MAX_FRAMES = 1 << 30  # the CUDA ranking packs the frame index into 30 bits of a sort key


def check_dpselect(feats: Tensor, num_frames: int, window: int) -> None:
    check_frame_distance(feats, OP)
    T = feats.shape[1]
    if T > MAX_FRAMES:
        raise ValueError(f"{OP}: feats has T={T} frames, at most {MAX_FRAMES} are supported")
    if not 0 <= num_frames <= T:
        raise ValueError(f"{OP}: num_frames must be in [0, T={T}], got {num_frames}")
    check_window(OP, window)


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


def target_frames(T: int, ratio: float) -> int:
    """max(1, round(ratio * T)) frames out of T for a keep ratio in (0, 1]."""
    if T < 1:
        raise ValueError(f"target_frames: T must be >= 1, got {T}")
    if not 0 < ratio <= 1:
        raise ValueError(f"target_frames: ratio must be in (0, 1], got {ratio}")
    return ref.target_frames(T, ratio)
