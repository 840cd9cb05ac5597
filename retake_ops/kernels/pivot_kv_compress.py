"""pivot_kv_compress_composite: the kernel of retake::pivot_kv_compress on every device.

score[b,j] = attn_scores(q, k)[b,:,j] summed over the kv heads / Hq: the mean over all Hq
query heads of each head's attention mass on key j (fp32, one score per token). Then one
top-k over a unique int64 key per token (select_tokens) and a row gather (kv_gather).
q [B,Hq,Lq,D], k and v [B,Hkv,Lk,D] fp16/bf16/fp32 any strides, pivot_mask bool [B,Lk] or
None. Built from retake ops (attn_scores: C++ on CPU, Triton on CUDA; kv_gather:
C++ on CPU, Triton on CUDA) and torch ops, with no host synchronization.
"""
import torch
from torch import Tensor

from ..checks import PIVOT_MAX_KEYS


def head_score_sum(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """fp32 [B, Lk]: each key's attention mass summed over every query head of q (attn_scores
    sums the queries of each kv head's group; this sums the kv heads). A tensor-parallel rank
    holding some of the heads gets its share of the sum (retake_ops.hf.parallel adds them up)."""
    return torch.ops.retake.attn_scores(q, k, scale, causal).sum(dim=1)


def token_scores(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """fp32 [B, Lk]: mean over all Hq query heads of each head's attention mass on every key."""
    return head_score_sum(q, k, scale, causal).div_(q.shape[1])


def rank_keys(scores: Tensor, pivot_mask: Tensor | None, force_pivots: bool) -> Tensor:
    """int64 [B, Lk]: unique keys whose descending order is select_tokens' ranking."""
    if pivot_mask is not None and not force_pivots:
        scores = scores.masked_fill(pivot_mask, 1.0)
    scores = torch.where(scores.isnan(), float("inf"), scores + 0.0)
    bits = scores.view(torch.int32)
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)  # monotone in the float value
    Lk = scores.shape[-1]
    key = (order << 31) | (PIVOT_MAX_KEYS - 1 - torch.arange(Lk, device=scores.device))
    if pivot_mask is not None and force_pivots:
        key = key + (pivot_mask.to(torch.int64) << 62)
    return key


def select_tokens(scores: Tensor, pivot_mask: Tensor | None, keep: int, force_pivots: bool = True) -> Tensor:
    """keep_idx int64 [B, keep] ascending: the top `keep` of scores [B, Lk] (fp32), pivots first
    (force_pivots) or with pivot scores set to 1.0 (not force_pivots), ties to the lower index.

    One top-k over unique int64 keys: bit 62 pivot (force_pivots), bits 31..61 the score's
    order-preserving int32 image, bits 0..30 (2^31 - 1 - index). Unique keys make the selection
    deterministic; torch.topk alone leaves ties open. NaN scores rank as +inf (torch.topk ranks
    NaN first), and -0.0 ties with +0.0.
    """
    key = rank_keys(scores, pivot_mask, force_pivots)
    top = torch.topk(key, keep, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values


def select_mask(scores: Tensor, pivot_mask: Tensor | None, keep: Tensor, force_pivots: bool = True) -> Tensor:
    """bool [B, Lk]: select_tokens' choice with a budget per row, keep int64 [B] in [1, Lk]."""
    key = rank_keys(scores, pivot_mask, force_pivots)
    threshold = key.sort(dim=-1, descending=True).values.gather(1, keep[:, None] - 1)
    return key >= threshold


def pivot_kv_compress_composite(q: Tensor, k: Tensor, v: Tensor, pivot_mask: Tensor | None, keep: int,
                                causal: bool = False, scale: float | None = None,
                                force_pivots: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Arguments as retake::pivot_kv_compress, already checked."""
    keep_idx = select_tokens(token_scores(q, k, scale, causal), pivot_mask, keep, force_pivots)
    k_kept, v_kept = torch.ops.retake.kv_gather(k, v, keep_idx, False)  # topk indices are in range
    return k_kept, v_kept, keep_idx
