"""Reference for retake::local_peaks: first maxima of a sliding window."""
import math

import torch
import torch.nn.functional as F


def local_peaks(dist: torch.Tensor, window: int = 3) -> torch.Tensor:
    """t is a peak iff dist[t] is the first maximum of dist[t-window//2 : t+window//2+1]
    clipped to [0, T). NaN counts as -inf. Returns bool, same shape as dist."""
    shape = dist.shape
    if shape[-1] == 0:  # no points, no peaks (max_pool1d rejects empty rows)
        return torch.zeros(shape, dtype=torch.bool, device=dist.device)
    x = dist.float().reshape(math.prod(shape[:-1]), 1, shape[-1])
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    _, argmax = F.max_pool1d(x, window, stride=1, padding=window // 2, return_indices=True)
    own = torch.arange(shape[-1], device=dist.device)
    return (argmax == own).reshape(shape)
