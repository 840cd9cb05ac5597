"""retake::kv_gather(k[B,H,L,D], v[B,H,L,D], idx, check_bounds=True) -> (k', v') [B,H,L',D]
and retake::kv_gather_out(k, v, idx, out_k!, out_v!, check_bounds=True) -> ().

k'[b,h,i] = k[b,h,idx[b,i]] with idx int64 [B,L'] shared by every head, or k[b,h,idx[b,h,i]]
with idx [B,H,L'] per head; the same for v. Out buffers may overlap k and v (the kernels go
through a temporary), but not each other and not themselves (an expanded, stride-0 or
otherwise self-overlapping buffer is rejected, as torch's own out= ops do). Inference-only:
kv_gather raises at call time on an input that requires grad under grad mode; kv_gather_out
(a mutating op, which autograd cannot wrap) writes its buffers without any autograd graph.

Two ops because a custom op may neither return an alias of an input nor have a return type
that depends on whether a buffer was passed: the functional op returns fresh tensors, the
out variant declares out_k and out_v as mutated and returns nothing. `kv_gather` below is
the wrapper that picks one, so callers write `kv_gather(k, v, idx, out_k=..., out_v=...)`.

Kernels (both ops):
  CPU   kv_gather_cpu / kv_gather_out_cpu  csrc/cpu/kv_gather.cpp (C++, retake_ops._C)
  CUDA  kv_gather_triton                   retake_ops/triton/kv_gather.py, where triton imports
  else  gather_into                        retake_ops/kernels/kv_gather.py (on retake_ops.ref.kv_gather)
"""
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_kv_gather, check_kv_gather_out, check_out_buffers_apart
from ..kernels.kv_gather import gather_into
from ._registry import inference_only, register_cuda

OP = "kv_gather"
OP_OUT = "kv_gather_out"


def _empty_like_gather(k: Tensor, idx: Tensor) -> Tensor:
    B, H, _, D = k.shape
    return k.new_empty((B, H, idx.shape[-1], D))


@torch.library.custom_op("retake::kv_gather", mutates_args=())
def kv_gather_op(k: Tensor, v: Tensor, idx: Tensor, check_bounds: bool = True) -> tuple[Tensor, Tensor]:
    """Gather rows of k and v along L at idx ([B, L'] shared or [B, H, L'] per head): new
    [B, H, L', D] tensors. check_bounds=True raises ValueError on an index outside [0, L)
    (on CUDA after the launch, reading one scalar back); check_bounds=False is for trusted
    indices (no host sync, CUDA-graph friendly) and yields zero rows for any index out of
    range. Inference-only."""
    check_kv_gather(OP, k, v, idx)
    out_k, out_v = _empty_like_gather(k, idx), _empty_like_gather(v, idx)
    gather_into(OP, k, v, idx, out_k, out_v, check_bounds)
    return out_k, out_v


@kv_gather_op.register_fake
def _(k, v, idx, check_bounds=True):
    check_kv_gather(OP, k, v, idx)
    return _empty_like_gather(k, idx), _empty_like_gather(v, idx)


@torch.library.custom_op("retake::kv_gather_out", mutates_args=("out_k", "out_v"))
def kv_gather_out(k: Tensor, v: Tensor, idx: Tensor, out_k: Tensor, out_v: Tensor,
                  check_bounds: bool = True) -> None:
    """kv_gather writing into caller-given out_k, out_v [B, H, L', D] (any strides without
    self-overlap, e.g. a slice of a preallocated cache; they may overlap k and v). On an index
    error the buffers' contents are unspecified. Inference-only."""
    check_kv_gather_out(k, v, idx, out_k, out_v)
    check_out_buffers_apart(out_k, out_v)
    gather_into(OP_OUT, k, v, idx, out_k, out_v, check_bounds)


@kv_gather_out.register_fake
def _(k, v, idx, out_k, out_v, check_bounds=True):
    check_kv_gather_out(k, v, idx, out_k, out_v)


inference_only(OP, kv_gather_op)
# kv_gather_out cannot take an autograd registration (a mutating op); it returns nothing and its
# writes never carry a graph, so a buffer it filled does not pretend to be differentiable.


def kv_gather(k: Tensor, v: Tensor, idx: Tensor, *, out_k: Optional[Tensor] = None,
              out_v: Optional[Tensor] = None, check_bounds: bool = True) -> tuple[Tensor, Tensor]:
    """Row gather of K and V along the sequence axis: (k', v') [B, H, L', D].

    idx is int64 [B, L'] (one selection shared by every head) or [B, H, L'] (per head).
    Without out buffers this is torch.ops.retake.kv_gather; with out_k and/or out_v (the
    missing one is allocated) it is torch.ops.retake.kv_gather_out and returns the buffers.
    See kv_gather_op for check_bounds. Inference-only.
    """
    if out_k is None and out_v is None:
        return torch.ops.retake.kv_gather(k, v, idx, check_bounds)
    check_kv_gather(OP_OUT, k, v, idx)
    out_k = _empty_like_gather(k, idx) if out_k is None else out_k
    out_v = _empty_like_gather(v, idx) if out_v is None else out_v
    torch.ops.retake.kv_gather_out(k, v, idx, out_k, out_v, check_bounds)
    return out_k, out_v


try:
    import triton  # noqa: F401
except ImportError:  # no triton: CUDA tensors fall back to gather_into
    triton = None

if triton is not None:
    from ..triton.kv_gather import kv_gather_triton

    def _kv_gather_cuda(k, v, idx, check_bounds=True):
        check_kv_gather(OP, k, v, idx)
        out_k, out_v = _empty_like_gather(k, idx), _empty_like_gather(v, idx)
        with torch.cuda.device(k.device):  # Triton launches on the current device
            return kv_gather_triton(k, v, idx, out_k, out_v, check_bounds, OP)

    def _kv_gather_out_cuda(k, v, idx, out_k, out_v, check_bounds=True):
        check_kv_gather_out(k, v, idx, out_k, out_v)
        check_out_buffers_apart(out_k, out_v)
        with torch.cuda.device(k.device):
            kv_gather_triton(k, v, idx, out_k, out_v, check_bounds, OP_OUT)

    register_cuda(OP, kv_gather_op, _kv_gather_cuda)
    register_cuda(OP_OUT, kv_gather_out, _kv_gather_out_cuda)
