"""Reference for retake::pivot_kv_compress: ReTaKe's PivotKV selection, softmax materialized.

A transliteration of the original PivotKVCache.update: softmax(q k^T * scale) in fp32 with K
repeated to the query heads, cast to the input dtype, summed over the queries, averaged over
the query heads of each kv group and then over the groups; pivot scores set to 1.0
(force_pivots=False, the original) or pivots ranked first (force_pivots=True); top-k, sorted.
Two departures, both rules of docs/ops.md: q k^T is computed in fp32 (the original multiplies in
the input dtype), and ties go to the lower index (the original's torch.topk leaves them open).
"""
import torch

from .attn_scores import causal_visible
from .kv_gather import kv_gather


def keep_tokens(L: int, ratio: float) -> int:
    """max(1, int(ratio * L)): how many of a chunk's L tokens a keep ratio leaves (the original's keep_len)."""
    return max(1, int(ratio * L))


def pivot_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                 causal: bool = False) -> torch.Tensor:
    """One score per key, [B, Lk] in q's dtype: the original's head-averaged attention mass.
    fp64 inputs are scored in fp64 throughout (the precise reference of the tests)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else scale
    k_rep = k.repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.matmul(q.to(acc), k_rep.to(acc).transpose(2, 3)) * scale  # [B, Hq, Lq, Lk]
    if causal:
        visible = causal_visible(Lq, Lk, q.device)
        logits = logits.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=acc)
    if causal:  # hidden keys get nothing from a row (one without keys, or a NaN one), as in attn_scores
        weights = weights.masked_fill(~visible, 0.0)
    weights = weights.to(q.dtype).sum(2)                       # [B, Hq, Lk]
    weights = weights.reshape(B, Hkv, Hq // Hkv, Lk).mean(2)   # [B, Hkv, Lk]
    return weights.mean(1)                                     # [B, Lk]


def pivot_kv_compress(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pivot_mask: torch.Tensor | None,
                      keep: int, causal: bool = False, scale: float | None = None, force_pivots: bool = True):
    """q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], pivot_mask bool [B, Lk] or None ->
    (k', v' [B, Hkv, keep, D], keep_idx int64 [B, keep] ascending)."""
    scores = pivot_scores(q, k, scale, causal)
    if pivot_mask is not None and not force_pivots:
        scores = scores.masked_fill(pivot_mask, 1.0)  # the original: "select key patches first"
    # Descending stable sort: its first `keep` are the top-k with ties to the lower index.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if pivot_mask is not None and force_pivots:
        pivots_first = torch.sort(pivot_mask.gather(-1, order).int(), dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, pivots_first)
    keep_idx = order[:, :keep].sort(dim=-1).values
    k_kept, v_kept = kv_gather(k, v, keep_idx)
    return k_kept, v_kept, keep_idx
