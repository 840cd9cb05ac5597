"""Reference for retake::frame_distance: cosine distance between adjacent frames."""
import torch
import torch.nn.functional as F

from retake_ops.ops._checks import nonfinite_message


def frame_distance(feats: torch.Tensor, sync: bool = True, first: float = 1.0,
                   check_finite: bool = True) -> torch.Tensor:
    """d[b,t,n] = 1 - cos(feats[b,t-1,n], feats[b,t,n]) in fp32, d[b,0,n] = first;
    sync=True averages over the N patches. feats: [B, T, N, C]."""
    x = feats.float()
    if check_finite and not torch.isfinite(x).all():
        raise ValueError(nonfinite_message("frame_distance", "feats"))
    B, T, N, _ = x.shape
    d = torch.full((B, T, N), first, dtype=torch.float32, device=x.device)
    d[:, 1:] = 1 - F.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1, eps=1e-8)
    return d.mean(dim=2) if sync else d
