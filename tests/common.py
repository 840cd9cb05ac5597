"""Shared test helpers."""
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_feats(B, T, N, C, dtype=torch.float32, seed=0, device="cpu"):
    """Random features, rounded to `dtype` so every path sees the same values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, N, C, generator=g).to(dtype).to(device)


def expected_distance(feats, sync=True, first=1.0):
    """frame_distance in fp64: the yardstick for the fp32 kernels."""
    x = feats.double()
    B, T, N, _ = x.shape
    d = torch.full((B, T, N), first, dtype=torch.float64)
    d[:, 1:] = 1 - torch.nn.functional.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1, eps=1e-8)
    return d.mean(2) if sync else d


def non_contiguous(x):
    """Same values as x, laid out with a permuted, padded stride pattern."""
    padded = torch.empty(x.shape[:-1] + (x.shape[-1] + 3,), dtype=x.dtype, device=x.device)
    padded[..., : x.shape[-1]] = x
    view = padded[..., : x.shape[-1]]
    assert not view.is_contiguous()
    return view
