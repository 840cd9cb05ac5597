"""Reference for retake::frame_distance: cosine distance between adjacent frames.

d = 1 - a.b / (max(|a|, eps) * max(|b|, eps)) with eps = 1e-8, as F.cosine_similarity defines
it, in fp32. Each feature vector is divided by its largest magnitude s before anything is
squared (the clamp becomes max(|a / s|, eps / s)), so finite features give finite, correct
distances at any magnitude, where squaring them directly would overflow.
"""
import torch

EPS = 1e-8


def nonfinite_message(op: str) -> str:
    return (f"{op}: feats contains NaN or Inf; pass check_finite=False to skip this check "
            f"(non-finite distances then rank lowest)")


def frame_distance(feats: torch.Tensor, sync: bool = True, first: float = 1.0,
                   check_finite: bool = True) -> torch.Tensor:
    """d[b,t,n] = 1 - cos(feats[b,t-1,n], feats[b,t,n]) in fp32, d[b,0,n] = first;
    sync=True averages over the N patches. feats: [B, T, N, C]."""
    x = feats.float()
    if check_finite and not torch.isfinite(x).all():
        raise ValueError(nonfinite_message("frame_distance"))
    B, T, N, C = x.shape
    s = x.abs().amax(dim=-1, keepdim=True) if C else x.new_ones(B, T, N, 1)
    s = torch.where(s > 0, s, 1.0)  # a zero vector stays zero: cosine 0 with anything
    u = x / s
    norm = torch.maximum(torch.linalg.vector_norm(u, dim=-1), EPS / s[..., 0])
    cos = (u[:, :-1] * u[:, 1:]).sum(dim=-1) / norm[:, :-1] / norm[:, 1:]
    d = torch.full((B, T, N), first, dtype=torch.float32, device=x.device)
    d[:, 1:] = 1 - cos
    return d.mean(dim=2) if sync else d
