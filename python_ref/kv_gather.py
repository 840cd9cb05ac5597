"""Reference for retake::kv_gather: gather rows of K and V along the sequence axis."""
import torch


def kv_gather(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor):
    """k'[b,h,i] = k[b,h,idx[b,i]] (shared idx [B, L']) or k[b,h,idx[b,h,i]] (per-head idx
    [B, H, L']), the same for v. k, v: [B, H, L, D]; indices must lie in [0, L)."""
    B, H, _, D = k.shape
    if idx.dim() == 2:
        idx = idx[:, None, :].expand(B, H, idx.shape[-1])
    index = idx[..., None].expand(*idx.shape, D)
    return k.gather(2, index), v.gather(2, index)
