"""retake::pivot_kv_compress(q[B,Hq,Lq,D], k[B,Hkv,Lk,D], v[B,Hkv,Lk,D], pivot_mask[B,Lk] | None,
keep, causal=False, scale=None, force_pivots=True) -> (k', v' [B,Hkv,keep,D], keep_idx int64 [B,keep]).

score[b,j] = attn_scores(q, k)[b,:,j] summed over the kv heads / Hq: the mean over all Hq query
heads of each head's attention mass on key j (one score per token, shared by every head).
force_pivots=True ranks pivots first (all kept; the best-scored ones if they outnumber keep);
force_pivots=False is the original ReTaKe rule: pivot scores set to 1.0, then top-k. Ties go
to the lower index. keep_idx is ascending; k', v' are the kept rows. Inference-only (an input
that requires grad under grad mode raises at call time).

Kernels (the same on CPU and CUDA):
  pivot_kv_compress_composite  retake_ops/kernels/pivot_kv_compress.py: token scores from
      retake::attn_scores (attn_scores_cpu / attn_scores_triton), the selection key
      select_tokens, then retake::kv_gather (kv_gather_cpu / kv_gather_triton); no host sync.
  else  the body below, the same composite.
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import check_keep_tokens, check_pivot_kv_compress
from ..kernels.pivot_kv_compress import pivot_kv_compress_composite
from ._registry import inference_only, register_cpu, register_cuda

OP = "pivot_kv_compress"


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
    return _composite(q, k, v, pivot_mask, keep, causal, scale, force_pivots)


@pivot_kv_compress.register_fake
def _(q, k, v, pivot_mask, keep, causal=False, scale=None, force_pivots=True):
    check_pivot_kv_compress(q, k, v, pivot_mask, keep, scale)
    B, Hkv, _, D = k.shape
    return (k.new_empty((B, Hkv, keep, D)), v.new_empty((B, Hkv, keep, D)),
            k.new_empty((B, keep), dtype=torch.int64))


def _composite(q: Tensor, k: Tensor, v: Tensor, pivot_mask: Tensor | None, keep: int, causal: bool = False,
               scale: float | None = None, force_pivots: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    check_pivot_kv_compress(q, k, v, pivot_mask, keep, scale)
    return pivot_kv_compress_composite(q, k, v, pivot_mask, keep, causal, scale, force_pivots)


# The composite is the kernel on both devices; registering it names it in build_info().
register_cpu(OP, pivot_kv_compress, _composite, kind="composite")
register_cuda(OP, pivot_kv_compress, _composite, kind="composite")
inference_only(OP, pivot_kv_compress)


def keep_tokens(L: int, ratio: float) -> int:
    """max(1, int(ratio * L)) tokens of a chunk of L (an int >= 1) for a keep ratio in (0, 1]."""
    return ref.keep_tokens(*check_keep_tokens(L, ratio))
