"""Reference for retake::nms_select: greedy temporal non-maximum suppression."""
import torch

NAN_MESSAGE = "nms_select: scores contains NaN, expected finite or +-inf scores (use -inf for unwanted frames)"


def nms_radius(N: int, k: int, radius: int) -> int:
    """The suppression radius nms_select uses: `radius`, or N // (4k) for radius=-1 (0 when k=0)."""
    if radius != -1:
        return radius
    return N // (4 * k) if k > 0 else 0


def nms_select(scores: torch.Tensor, k: int, radius: int = -1) -> torch.Tensor:
    """Greedy NMS over frames, int64 [B, k] ascending.

    Repeatedly take the highest-scored frame that is not suppressed (ties: lower
    index) and suppress every frame j with |i - j| <= radius. -inf frames never take
    part in this phase (they neither win nor suppress). Once no frame is left, take
    the best frames not yet taken (same order: score desc, index asc, -inf last).
    Scores are compared in fp32, or in fp64 when they are fp64: never rounded.
    """
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if torch.isnan(s).any():
        raise ValueError(NAN_MESSAGE)
    B, N = s.shape
    r = nms_radius(N, k, radius)
    pos = torch.arange(N, device=s.device)
    rows = torch.arange(B, device=s.device)
    taken = torch.zeros(B, N, dtype=torch.bool, device=s.device)
    suppressed = s == float("-inf")
    picks = []
    for _ in range(k):
        free = ~suppressed
        # NMS while a row has an unsuppressed frame; afterwards any frame not yet taken.
        cand = torch.where(free.any(dim=1, keepdim=True), free, ~taken)
        best = torch.where(cand, s, float("-inf")).amax(dim=1, keepdim=True)
        j = (cand & (s == best)).int().argmax(dim=1)  # argmax returns the first maximum
        taken[rows, j] = True
        suppressed |= (pos[None, :] - j[:, None]).abs() <= r
        picks.append(j)
    if not picks:
        return torch.empty(B, 0, dtype=torch.int64, device=s.device)
    return torch.stack(picks, dim=1).sort(dim=1).values
