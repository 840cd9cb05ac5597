"""Reference for retake::attn_scores: per-key attention mass, softmax materialized.

out[b, h, j] = sum over the query heads g of kv head h (GQA: g in [h*G, (h+1)*G),
G = Hq // Hkv) and over the query rows i of softmax_j(scale * q[b,g,i] . k[b,h,j]).

Causal masking is bottom-right aligned as in flash-attention: query i sees the keys
j <= Lk - Lq + i. When Lq > Lk the first Lq - Lk query rows see no key at all; such
a row has no softmax and contributes nothing (zero) to every key, on every path.

A NaN among a row's logits (or a +inf, which softmax turns into NaN) makes that row's
softmax NaN: the row adds NaN to every key it sees, never zeros; a key hidden from the
row gets nothing from it.
"""
import torch


def causal_visible(Lq: int, Lk: int, device=None) -> torch.Tensor:
    """bool [Lq, Lk]: True where query i may attend key j (j <= Lk - Lq + i)."""
    i = torch.arange(Lq, device=device)
    j = torch.arange(Lk, device=device)
    return j[None, :] <= (i + (Lk - Lq))[:, None]


def attn_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                causal: bool = False) -> torch.Tensor:
    """q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D] -> fp32 [B, Hkv, Lk].

    Materializes the full [B, Hq, Lq, Lk] softmax in fp32 (fp64 when q and k are fp64,
    which the tests use as the precise reference)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else scale
    qg = q.to(acc).reshape(B, Hkv, Hq // Hkv, Lq, D)
    s = torch.einsum("bhgid,bhjd->bhgij", qg, k.to(acc)) * scale
    if causal:
        visible = causal_visible(Lq, Lk, q.device)
        s = s.masked_fill(~visible, float("-inf"))
        # Hidden keys get nothing from a row, also from a row that sees no key (all -inf,
        # softmaxed to NaN) or a NaN row (NaN everywhere after the softmax).
        p = torch.softmax(s, dim=-1).masked_fill(~visible, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    return p.sum(dim=(2, 3))
