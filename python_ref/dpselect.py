"""Reference for retake::dpselect: keep frames peaks-first down to a budget."""
import torch

from .frame_distance import frame_distance, nonfinite_message
from .local_peaks import local_peaks


def target_frames(T: int, ratio: float) -> int:
    """max(1, round(ratio * T)): how many of T frames a keep ratio leaves."""
    return max(1, round(ratio * T))


def dpselect(feats: torch.Tensor, num_frames: int, window: int = 3, sync: bool = True,
             check_finite: bool = True):
    """Rank frames peaks first, then by larger distance, then by lower index; keep the
    first num_frames, ascending. Returns (idx int64, is_pivot bool), [B, k] or [B, k, N]."""
    if check_finite and not torch.isfinite(feats).all():
        raise ValueError(nonfinite_message("dpselect"))
    d = frame_distance(feats, sync=sync, check_finite=False)
    if not sync:
        d = d.transpose(1, 2)  # [B, N, T]: every patch ranks its own column
    d = torch.nan_to_num(d, nan=float("-inf"))
    peaks = local_peaks(d, window)
    # Two stable sorts give the lexicographic order (peak desc, distance desc, index asc).
    by_dist = torch.sort(d, dim=-1, descending=True, stable=True).indices
    by_peak = torch.sort(peaks.gather(-1, by_dist).int(), dim=-1, descending=True, stable=True).indices
    order = by_dist.gather(-1, by_peak)
    idx = order[..., :num_frames].sort(dim=-1).values
    is_pivot = peaks.gather(-1, idx)
    if not sync:
        idx, is_pivot = idx.transpose(1, 2), is_pivot.transpose(1, 2)
    return idx.contiguous(), is_pivot.contiguous()
