"""retake::kv_gather(k[B,H,L,D], v[B,H,L,D], idx, check_bounds=True) -> (k', v') [B,H,L',D]
and retake::kv_gather_out(k, v, idx, out_k!, out_v!, check_bounds=True) -> ().

k'[b,h,i] = k[b,h,idx[b,i]] with idx int64 [B,L'] shared by every head, or k[b,h,idx[b,h,i]]
with idx [B,H,L'] per head; the same for v. Inference-only: no autograd formula.

Two ops because a custom op may neither return an alias of an input nor have a return type
that depends on whether a buffer was passed: the functional op returns fresh tensors, the
out variant declares out_k and out_v as mutated and returns nothing. `kv_gather` below is
the wrapper that picks one, so callers write `kv_gather(k, v, idx, out_k=..., out_v=...)`.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import ref
from ._checks import (check_float, check_rank, check_same_device, index_range_message, memory_overlaps,
                      shape_str)
from ._registry import register_cuda

OP = "kv_gather"
OP_OUT = "kv_gather_out"


def check_kv_gather(op: str, k: Tensor, v: Tensor, idx: Tensor) -> None:
    check_rank(op, "k", k, 4, "[B, H, L, D]")
    check_rank(op, "v", v, 4, "[B, H, L, D]")
    check_float(op, "k", k)
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have the shape of k {shape_str(k)}, got {shape_str(v)}")
    if v.dtype != k.dtype:
        raise ValueError(f"{op}: v must have the dtype of k ({k.dtype}), got {v.dtype}")
    if idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be torch.int64, got {idx.dtype}")
    if idx.dim() not in (2, 3):
        raise ValueError(f"{op}: idx must be a 2-D tensor [B, L'] or a 3-D tensor [B, H, L'], "
                         f"got shape {shape_str(idx)}")
    B, H = k.shape[0], k.shape[1]
    if idx.shape[0] != B or (idx.dim() == 3 and idx.shape[1] != H):
        raise ValueError(f"{op}: idx must have shape [B={B}, L'] or [B={B}, H={H}, L'], "
                         f"got {shape_str(idx)}")
    check_same_device(op, k=k, v=v, idx=idx)


def check_out(op: str, name: str, out: Tensor, k: Tensor, idx: Tensor) -> None:
    B, H, _, D = k.shape
    L_out = idx.shape[-1]
    if tuple(out.shape) != (B, H, L_out, D):
        raise ValueError(f"{op}: {name} must have shape [{B}, {H}, {L_out}, {D}], got {shape_str(out)}")
    if out.dtype != k.dtype:
        raise ValueError(f"{op}: {name} must have the dtype of k ({k.dtype}), got {out.dtype}")


def check_kv_gather_out(k: Tensor, v: Tensor, idx: Tensor, out_k: Tensor, out_v: Tensor) -> None:
    check_kv_gather(OP_OUT, k, v, idx)
    check_out(OP_OUT, "out_k", out_k, k, idx)
    check_out(OP_OUT, "out_v", out_v, k, idx)
    check_same_device(OP_OUT, k=k, out_k=out_k, out_v=out_v)


def check_no_overlap(op: str, out_k: Tensor, out_v: Tensor) -> None:
    """Real tensors only (fake ones have no memory): out_k and out_v are written independently."""
    if memory_overlaps(out_k, out_v):
        raise ValueError(f"{op}: out_k and out_v must not overlap in memory")


def gather_into(op: str, k: Tensor, v: Tensor, idx: Tensor, out_k: Tensor, out_v: Tensor,
                check_bounds: bool) -> None:
    """Reference-backed gather used where no compiled kernel serves the device; rows of
    out-of-range indices become zeros when they are not checked, as in the kernels."""
    L = k.shape[2]
    if check_bounds and idx.numel() and (idx.min() < 0 or idx.max() >= L):
        raise ValueError(index_range_message(op, "idx", L, int(idx.min()), int(idx.max())))
    valid = (idx >= 0) & (idx < L)
    if L == 0:
        out_k.zero_()
        out_v.zero_()
        return
    gk, gv = ref.kv_gather(k, v, torch.where(valid, idx, 0))
    keep = valid[..., None] if idx.dim() == 3 else valid[:, None, :, None]
    out_k.copy_(gk.masked_fill(~keep, 0))
    out_v.copy_(gv.masked_fill(~keep, 0))


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
    """kv_gather writing into caller-given out_k, out_v [B, H, L', D] (any strides, e.g. a
    slice of a preallocated cache; they may overlap k and v, then the rows go through a
    temporary). On an index error the buffers' contents are unspecified. Inference-only."""
    check_kv_gather_out(k, v, idx, out_k, out_v)
    check_no_overlap(OP_OUT, out_k, out_v)
    gather_into(OP_OUT, k, v, idx, out_k, out_v, check_bounds)


@kv_gather_out.register_fake
def _(k, v, idx, out_k, out_v, check_bounds=True):
    check_kv_gather_out(k, v, idx, out_k, out_v)


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
    from ..triton.kv_gather import kv_gather_triton
except ImportError:
    kv_gather_triton = None

if kv_gather_triton is not None:
    def kv_gather_cuda(k, v, idx, check_bounds=True):
        check_kv_gather(OP, k, v, idx)
        out_k, out_v = _empty_like_gather(k, idx), _empty_like_gather(v, idx)
        with torch.cuda.device(k.device):  # Triton launches on the current device
            return kv_gather_triton(k, v, idx, out_k, out_v, check_bounds, OP)

    def kv_gather_out_cuda(k, v, idx, out_k, out_v, check_bounds=True):
        check_kv_gather_out(k, v, idx, out_k, out_v)
        check_no_overlap(OP_OUT, out_k, out_v)
        with torch.cuda.device(k.device):
            kv_gather_triton(k, v, idx, out_k, out_v, check_bounds, OP_OUT)

    register_cuda(OP, kv_gather_op, kv_gather_cuda)
    register_cuda(OP_OUT, kv_gather_out, kv_gather_out_cuda)
