"""retake::attn_scores(q[B,Hq,Lq,D], k[B,Hkv,Lk,D], scale=None, causal=False) -> fp32 [B,Hkv,Lk].

out[b,h,j] = sum over the Hq/Hkv query heads g of group h and over query rows i of
softmax_j(scale * q[b,g,i] . k[b,h,j]), scale defaulting to D**-0.5. Causal is bottom-right
aligned (query i sees keys j <= Lk - Lq + i); a query row that sees no key (Lq > Lk, causal)
contributes nothing. A NaN in a row's logits makes that row's contributions NaN on the keys it
sees (never zeros); keys hidden from it get nothing from it. Never materializes Lq x Lk.
Inference-only (an input that requires grad under grad mode raises at call time).

Kernels:
  CPU   attn_scores_cpu     csrc/cpu/attn_scores.cpp (C++, retake_ops._C): whole tasks per thread,
                            each with its own GEMM and a fused softmax tail built per instruction
                            set (csrc/cpu/softmax_colsum.h; RETAKE_OPS_CPU_ISA forces one,
                            build_info() names it)
  CUDA  attn_scores_triton  retake_ops/triton/attn_scores.py (two-pass Triton), where triton imports
  else  the body below: on CPU (without retake_ops._C) attn_scores_blocked, blocked torch with
        bounded scratch (retake_ops/kernels/attn_scores.py); elsewhere retake_ops.ref.attn_scores
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import check_attn_scores
from ..kernels.attn_scores import attn_scores_blocked
from ._registry import inference_only, register_cpu_fallback, register_cuda

OP = "attn_scores"


@torch.library.custom_op("retake::attn_scores", mutates_args=())
def attn_scores(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """Attention mass each key receives: fp32 [B, Hkv, Lk], summed over query rows and
    over the query heads of each kv head's group (GQA), without materializing Lq x Lk.

    q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D], fp16/bf16/fp32, same dtype and device,
    Hq % Hkv == 0, D <= 256. scale: None for D**-0.5. causal: bottom-right aligned.
    Inference-only.
    """
    check_attn_scores(q, k, scale)
    if q.device.type == "cpu":
        return attn_scores_blocked(q, k, scale, causal)
    return ref.attn_scores(q, k, scale, causal)


@attn_scores.register_fake
def _(q, k, scale=None, causal=False):
    check_attn_scores(q, k, scale)
    return q.new_empty((k.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


register_cpu_fallback(OP, "blocked torch")
inference_only(OP, attn_scores)

try:
    import triton  # noqa: F401
except ImportError:  # no triton: CUDA tensors fall back to the reference
    triton = None

if triton is not None:
    from ..triton.attn_scores import attn_scores_triton

    def _attn_scores_cuda(q: Tensor, k: Tensor, scale: float | None = None,
                          causal: bool = False) -> Tensor:
        check_attn_scores(q, k, scale)
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return attn_scores_triton(q, k, scale, causal)

    register_cuda(OP, attn_scores, _attn_scores_cuda)
