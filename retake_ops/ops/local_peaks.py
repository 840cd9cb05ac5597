"""retake::local_peaks(dist[..., T], window=3) -> bool[..., T].

t is a peak iff dist[t] is the first maximum of the window
[t - window//2, t + window//2] clipped to [0, T): plateaus peak at their left
end, edges can peak, NaN counts as -inf. Inference-only.
"""
import torch
from torch import Tensor

from .. import ref
from ._checks import check_float, check_window, shape_str

OP = "local_peaks"


def check_local_peaks(dist: Tensor, window: int) -> None:
    if dist.dim() < 1:
        raise ValueError(f"{OP}: dist must have at least 1 dimension [..., T], got shape {shape_str(dist)}")
    check_float(OP, "dist", dist)
    check_window(OP, window)


@torch.library.custom_op("retake::local_peaks", mutates_args=())
def local_peaks(dist: Tensor, window: int = 3) -> Tensor:
    """Bool mask of the first maxima of each odd-sized window along the last dim."""
    check_local_peaks(dist, window)
    return ref.local_peaks(dist, window)


@local_peaks.register_fake
def _(dist, window=3):
    check_local_peaks(dist, window)
    return torch.empty_like(dist, dtype=torch.bool, memory_format=torch.contiguous_format)
