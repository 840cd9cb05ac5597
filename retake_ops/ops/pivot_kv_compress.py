"""retake::pivot_kv_compress(q[B,Hq,Lq,D], k[B,Hkv,Lk,D], v[B,Hkv,Lk,D], pivot_mask[B,Lk] | None,
keep, causal=False, scale=None, force_pivots=True) -> (k', v' [B,Hkv,keep,D], keep_idx int64 [B,keep]).

score[b,j] = attn_scores(q, k)[b,:,j] summed over the kv heads / Hq: the mean over all Hq query
heads of each head's attention mass on key j (one score per token, shared by every head).
force_pivots=True ranks pivots first (all kept; the best-scored ones if they outnumber keep);
force_pivots=False is the original ReTaKe rule: pivot scores set to 1.0, then top-k. Ties go
to the lower index. keep_idx is ascending; k', v' are the kept rows. Inference-only.

Composed of retake ops (attn_scores: Triton on CUDA, blocked on CPU; kv_gather) and torch
ops, with no host synchronization, so it is the kernel for every device.
"""
import math

import torch
from torch import Tensor

from .. import ref
from ._checks import check_float, check_rank, check_same_device, shape_str
from ._registry import register_cpu, register_cuda

OP = "pivot_kv_compress"
MAX_HEAD_DIM = 256  # attn_scores' limit
MAX_KEYS = 1 << 31  # the selection packs the key index into 31 bits of a sort key


def check_pivot_kv_compress(q: Tensor, k: Tensor, v: Tensor, pivot_mask: Tensor | None, keep: int,
                            scale: float | None) -> None:
    check_rank(OP, "q", q, 4, "[B, Hq, Lq, D]")
    check_rank(OP, "k", k, 4, "[B, Hkv, Lk, D]")
    check_rank(OP, "v", v, 4, "[B, Hkv, Lk, D]")
    check_float(OP, "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{OP}: q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"{OP}: v must have the shape of k {shape_str(k)}, got {shape_str(v)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{OP}: q and k must agree on B and D, got q {shape_str(q)} and k {shape_str(k)}")
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{OP}: q has Hq={Hq} heads and k has Hkv={Hkv}: Hq must be a positive "
                         f"multiple of Hkv (Hq % Hkv == 0)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim D must be in [1, {MAX_HEAD_DIM}], got D={D}")
    if Lk >= MAX_KEYS:
        raise ValueError(f"{OP}: k has Lk={Lk} tokens, at most {MAX_KEYS - 1} are supported")
    if not 1 <= keep <= Lk:
        raise ValueError(f"{OP}: keep must be in [1, Lk={Lk}], got {keep}")
    if pivot_mask is not None:
        if pivot_mask.dtype != torch.bool:
            raise ValueError(f"{OP}: pivot_mask must be a bool tensor, got {pivot_mask.dtype}")
        if tuple(pivot_mask.shape) != (B, Lk):
            raise ValueError(f"{OP}: pivot_mask must have shape [B={B}, Lk={Lk}], got {shape_str(pivot_mask)}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{OP}: scale must be a finite number > 0 (or None for D**-0.5), got {scale}")
    check_same_device(OP, q=q, k=k, v=v, pivot_mask=pivot_mask)


def token_scores(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """fp32 [B, Lk]: mean over all Hq query heads of each head's attention mass on every key
    (attn_scores sums the queries of each kv head's group, so the mean divides by Hq)."""
    return torch.ops.retake.attn_scores(q, k, scale, causal).sum(dim=1).div_(q.shape[1])


def select_tokens(scores: Tensor, pivot_mask: Tensor | None, keep: int, force_pivots: bool = True) -> Tensor:
    """keep_idx int64 [B, keep] ascending: the top `keep` of scores [B, Lk] (fp32), pivots first
    (force_pivots) or with pivot scores set to 1.0 (not force_pivots), ties to the lower index.

    One top-k over unique int64 keys: bit 62 pivot (force_pivots), bits 31..61 the score's
    order-preserving int32 image, bits 0..30 (2^31 - 1 - index). Unique keys make the selection
    deterministic; torch.topk alone leaves ties open. NaN scores rank as +inf (torch.topk ranks
    NaN first), and -0.0 ties with +0.0.
    """
    if pivot_mask is not None and not force_pivots:
        scores = scores.masked_fill(pivot_mask, 1.0)
    scores = torch.where(scores.isnan(), float("inf"), scores + 0.0)
    bits = scores.view(torch.int32)
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)  # monotone in the float value
    Lk = scores.shape[-1]
    key = (order << 31) | (MAX_KEYS - 1 - torch.arange(Lk, device=scores.device))
    if pivot_mask is not None and force_pivots:
        key = key + (pivot_mask.to(torch.int64) << 62)
    top = torch.topk(key, keep, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values


def pivot_kv_compress_composite(q: Tensor, k: Tensor, v: Tensor, pivot_mask: Tensor | None, keep: int,
                                causal: bool = False, scale: float | None = None,
                                force_pivots: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    check_pivot_kv_compress(q, k, v, pivot_mask, keep, scale)
    keep_idx = select_tokens(token_scores(q, k, scale, causal), pivot_mask, keep, force_pivots)
    k_kept, v_kept = torch.ops.retake.kv_gather(k, v, keep_idx, False)  # topk indices are in range
    return k_kept, v_kept, keep_idx


@torch.library.custom_op("retake::pivot_kv_compress", mutates_args=())
def pivot_kv_compress(q: Tensor, k: Tensor, v: Tensor, pivot_mask: Tensor | None, keep: int,
                      causal: bool = False, scale: float | None = None,
                      force_pivots: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """PivotKV eviction of one chunk: keep `keep` of its Lk tokens by head-averaged attention.

    q [B, Hq, Lq, D] (the chunk's queries), k, v [B, Hkv, Lk, D] (its keys and values),
    pivot_mask bool [B, Lk] or None, 1 <= keep <= Lk. Returns k', v' [B, Hkv, keep, D] and
    keep_idx int64 [B, keep] ascending. Scores never materialize Lq x Lk (attn_scores), and
    the CUDA path has no host synchronization. Inference-only.
    """
    return pivot_kv_compress_composite(q, k, v, pivot_mask, keep, causal, scale, force_pivots)


@pivot_kv_compress.register_fake
def _(q, k, v, pivot_mask, keep, causal=False, scale=None, force_pivots=True):
    check_pivot_kv_compress(q, k, v, pivot_mask, keep, scale)
    B, Hkv, _, D = k.shape
    return (k.new_empty((B, Hkv, keep, D)), v.new_empty((B, Hkv, keep, D)),
            k.new_empty((B, keep), dtype=torch.int64))


# The composite body is the kernel on both devices; registering it names it in build_info().
register_cpu(OP, pivot_kv_compress, pivot_kv_compress_composite, kind="composite")
register_cuda(OP, pivot_kv_compress, pivot_kv_compress_composite, kind="composite")


def keep_tokens(L: int, ratio: float) -> int:
    """max(1, int(ratio * L)) tokens of a chunk of L for a keep ratio in (0, 1]."""
    if L < 1:
        raise ValueError(f"keep_tokens: L must be >= 1, got {L}")
    if not 0 < ratio <= 1:
        raise ValueError(f"keep_tokens: ratio must be in (0, 1], got {ratio}")
    return ref.keep_tokens(L, ratio)
